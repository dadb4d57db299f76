"""Benchmark: `lora-tune export --format gguf` (llama.cpp's converter + lora-tune's read-back verification, and the
merge first for a run) against llama.cpp's converter run alone on the same merged folder.

The base is bench_merge.py's random Llama (written shard by shard) with the real Llama 3 vocabulary
(scripts/real_material.py caches it; the converter refuses tokenizers whose pre-tokenizer it does not know) and a
random LoRA adapter on every linear layer. Each side runs in its own process and reports its own peak resident
memory and wall time; the script prints them and the ratios.

    .venv/bin/python scripts/bench_gguf.py                                # 16 layers, hidden 1024, bf16
    .venv/bin/python scripts/bench_gguf.py --quants f16,q8_0,q4_k_m
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
VOCAB = ROOT / ".cache" / "real-material" / "tokenizers" / "llama-3.1"


def build(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """bench_merge's random base and adapter, with the real Llama 3 tokenizer in both."""
    from bench_merge import build as build_merge_bench
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(VOCAB)
    settings = {"shape": "bench-1g", "layers": args.layers, "hidden": None, "intermediate": None}
    settings.update(vocab=len(tokenizer), dtype=args.dtype, r=16, shard_mb=250)
    base, run = build_merge_bench(root, argparse.Namespace(**settings))
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]  # as a real checkpoint names it; the converter alone needs it
    (base / "config.json").write_text(json.dumps(config, indent=2))
    for folder in (base, run / "adapter"):
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            (folder / file).unlink(missing_ok=True)
        tokenizer.save_pretrained(folder)
    return base, run


def timed(command: list[str]) -> dict:
    """Run `command` under bench_gguf's own wrapper, which reports the child's peak RSS and peak anonymous memory."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--measure", *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": round(time.perf_counter() - started, 1), **figures}


def measure(command: list[str]) -> None:
    """Child side of `timed`: run the command, sampling its RssAnon (memory that can run out; mapped file pages in
    RSS can be dropped by the kernel) every 20 ms; ru_maxrss of all its processes too."""
    import resource

    child = subprocess.Popen(command, stdout=sys.stderr)
    anon = 0
    while child.poll() is None:
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
            anon = max(anon, next(int(x.split()[1]) for x in status.splitlines() if x.startswith("RssAnon:")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.02)
    if child.returncode != 0:
        raise SystemExit(child.returncode)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": round(rss), "peak_anon_mib": round(anon / 1024)}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        measure(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--quants", default="f16,q8_0")
    args = parser.parse_args()
    from lora_tune.export.gguf_converter import SCRIPT, converter_dir

    converter = converter_dir()
    lora_tune = [sys.executable, "-m", "lora_tune"]
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        root = Path(tmp)
        base, run = build(root, args)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        print(f"base: Llama {args.layers} layers, hidden 1024, Llama 3 vocab, {size / 2**30:.2f} GiB {args.dtype}")
        merged = root / "merged"
        merge = timed([*lora_tune, "merge", str(run), "--output", str(merged), "--dtype", args.dtype])
        print(f"merge (verified), for reference: {merge['seconds']:.1f} s, peak RSS {merge['peak_rss_mib']} MiB")
        for quant in args.quants.split(","):
            out = root / f"gguf-{quant}"
            ours = timed([*lora_tune, "export", str(merged), "--quant", quant, "--output", str(out)])
            record = json.loads((out / "export.json").read_text())["files"]
            entry = next(iter(record.values()))
            shutil.rmtree(out)
            line = f"{quant:>7}: lora-tune export {ours['seconds']:6.1f} s, peak RSS {ours['peak_rss_mib']:5d} MiB; "
            line += f"anonymous: lora-tune process {ours['peak_anon_mib']} MiB, converter "
            line += f"{entry['converter_peak_mib']:.0f} MiB (converter {entry['seconds']['convert']:.1f} s, read-back "
            line += f"{entry['seconds']['verify']:.1f} s; file {entry['bytes'] / 2**20:,.0f} MiB)"
            print(line, flush=True)
            if quant not in ("f16", "bf16", "q8_0"):
                continue
            command = [sys.executable, str(converter / SCRIPT), str(merged), "--outfile", str(root / "x.gguf")]
            alone = timed([*command, "--outtype", quant])
            (root / "x.gguf").unlink(missing_ok=True)
            ratio_time = ours["seconds"] / alone["seconds"]
            ratio_rss = ours["peak_rss_mib"] / alone["peak_rss_mib"]
            print(
                f"         llama.cpp's converter alone {alone['seconds']:6.1f} s, peak RSS {alone['peak_rss_mib']:5d} "
                f"MiB, anonymous {alone['peak_anon_mib']} MiB; lora-tune / alone: time {ratio_time:.2f}x, peak RSS "
                f"{ratio_rss:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
