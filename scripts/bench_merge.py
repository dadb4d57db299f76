"""Benchmark: lora-tune's streaming merge against peft's load + merge_and_unload + save, on the same inputs.

Builds a random-weight Llama of about 1.1 GB (float32, several safetensors shards) and a random LoRA adapter in a
temporary folder, then runs each merge in its own subprocess, so each peak RSS (ru_maxrss, reported by the child
itself) belongs to one method only. Prints wall time and peak RSS of both, their ratio, and the max |logit
difference| between the two merged models on a few inputs.

    .venv/bin/python scripts/bench_merge.py [--layers 16] [--hidden 1024] [--shard-mb 250] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """\
model:
  name: {base}
  dtype: float32
adapter:
  r: {r}
  alpha: {alpha}
datasets:
  - path: data.jsonl
output_dir: {run}
"""


def build(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Random base (sharded) + random LoRA adapter in a run-directory layout; returns (base, run)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_tune.quickstart.tiny import build_tokenizer

    base, run = root / "base", root / "run"
    tokenizer = build_tokenizer(["the quick brown fox jumps over the lazy dog"] * 50, vocab_size=300)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(base, max_shard_size=f"{args.shard_mb}MB")
    tokenizer.save_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    peft_model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    (run / "recipe.yaml").write_text(RECIPE.format(base=base, r=args.r, alpha=2 * args.r, run=run))
    return base, run


def child(method: str, base: Path, run: Path, out: Path) -> None:
    """One merge, then print {"seconds", "peak_rss_mib"} as JSON on the last line."""
    started = time.perf_counter()
    if method == "streaming":
        from lora_tune.export import merge

        merge(run, out, dtype="fp32", verify=False)
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, run / "adapter").merge_and_unload()
        model.save_pretrained(out)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mib": round(peak_rss_mib())}))


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (reset by exec, unlike ru_maxrss, which a child started by
    fork + exec inherits from a large parent on Linux); ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(method: str, base: Path, run: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(base), str(run), str(out)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def logit_difference(a: Path, b: Path, vocab: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = []
    for folder in (a, b):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(ids).logits)
        del model
    return float((logits[0] - logits[1]).abs().max())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], *map(Path, sys.argv[3:6]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        build_args = argparse.Namespace(**json.loads(sys.argv[3]))
        build(Path(sys.argv[2]), build_args)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--shard-mb", type=int, default=250)
    parser.add_argument("--keep", type=Path, default=None, help="build in this folder and keep it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        root = args.keep or Path(tmp)
        started = time.perf_counter()
        # Built in a subprocess too, so that this process stays small while the merges run.
        settings = {k: getattr(args, k) for k in ("layers", "hidden", "vocab", "r", "shard_mb")}
        subprocess.run(
            [sys.executable, __file__, "--build", str(root), json.dumps(settings)], check=True, capture_output=True
        )
        base, run = root / "base", root / "run"
        shards = sorted(base.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in shards)
        print(
            f"base: {size / 2**30:.2f} GiB float32 in {len(shards)} shards, LoRA r={args.r} on all linear "
            f"layers (built in {time.perf_counter() - started:.0f}s)"
        )
        results = {}
        for method in ("streaming", "peft"):
            results[method] = run_child(method, base, run, root / f"merged-{method}")
            print(
                f"{method:>9}: {results[method]['seconds']:6.1f} s   peak RSS {results[method]['peak_rss_mib']:6d} MiB"
            )
        ratio = results["streaming"]["peak_rss_mib"] / results["peft"]["peak_rss_mib"]
        speed = results["peft"]["seconds"] / results["streaming"]["seconds"]
        print(f"peak RSS streaming / peft = {ratio:.2f}   (goal <= 0.33);   wall peft / streaming = {speed:.2f}x")
        diff = logit_difference(root / "merged-streaming", root / "merged-peft", args.vocab)
        print(f"max |logit difference| streaming vs peft merge: {diff:.3g}")


if __name__ == "__main__":
    main()
