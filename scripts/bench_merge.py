"""Benchmark: `lora-tune merge` as a user runs it (verification on), with --no-verify, and peft's load +
merge_and_unload + save, on the same random base and adapter.

The base is written shard by shard with random weights (never a whole model in memory, so Llama-3-8B's shape fits on
a small machine), with a random LoRA adapter on every linear layer of the decoder. Each method runs in its own
subprocess and reports its own peak resident memory (VmHWM) and wall time; the script prints them and their ratios,
and, when peft ran, the max |logit difference| between the default merge and peft's.

    .venv/bin/python scripts/bench_merge.py                                   # Llama, 16 layers, hidden 1024, fp32
    .venv/bin/python scripts/bench_merge.py --shape llama3-8b --dtype bf16 --methods default,no-verify
    .venv/bin/python scripts/bench_merge.py --shape llama3-8b --dtype bf16 --layers 2   # a 2-layer slice
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "bench-1g": (1024, 2816, 16, 16, 16, 32000),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPE = """\
model:
  name: {base}
  dtype: {dtype}
adapter:
  r: {r}
  alpha: {alpha}
datasets:
  - path: data.jsonl
output_dir: {run}
"""


def shape_of(args: argparse.Namespace) -> dict[str, int]:
    hidden, intermediate, layers, heads, kv, vocab = SHAPES[args.shape]
    return {
        "hidden": args.hidden or hidden,
        "intermediate": args.intermediate or intermediate,
        "layers": args.layers or layers,
        "heads": heads,
        "kv": kv,
        "vocab": args.vocab or vocab,
    }


def base_tensors(s: dict[str, int]) -> list[tuple[str, list[int]]]:
    """Names and shapes of a Llama checkpoint, in the order transformers saves them."""
    head_dim = s["hidden"] // s["heads"]
    q, kv, h, m = s["heads"] * head_dim, s["kv"] * head_dim, s["hidden"], s["intermediate"]
    out = [("model.embed_tokens.weight", [s["vocab"], h])]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", [h]),
            (p + "mlp.down_proj.weight", [h, m]),
            (p + "mlp.gate_proj.weight", [m, h]),
            (p + "mlp.up_proj.weight", [m, h]),
            (p + "post_attention_layernorm.weight", [h]),
            (p + "self_attn.k_proj.weight", [kv, h]),
            (p + "self_attn.o_proj.weight", [h, q]),
            (p + "self_attn.q_proj.weight", [q, h]),
            (p + "self_attn.v_proj.weight", [kv, h]),
        ]
    return out + [("model.norm.weight", [h]), ("lm_head.weight", [s["vocab"], h])]


def build(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Random base (sharded, written tensor by tensor) + random LoRA adapter in a run-directory layout."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lora_tune.model.weights import write_safetensors
    from lora_tune.quickstart.tiny import build_tokenizer

    s, dtype = shape_of(args), getattr(torch, DTYPES[args.dtype])
    base, run = root / "base", root / "run"
    base.mkdir(parents=True)
    LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        tie_word_embeddings=False,
        rope_theta=500000.0,
        dtype=DTYPES[args.dtype],
    ).save_pretrained(base)
    tokenizer = build_tokenizer(["the quick brown fox jumps over the lazy dog"] * 50, vocab_size=300)
    tokenizer.save_pretrained(base)
    generator = torch.Generator().manual_seed(0)

    def make(name: str, shape: list[int]) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=dtype)
        return (torch.randn(shape, generator=generator) * 0.02).to(dtype)

    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in base_tensors(s):
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > args.shard_mb * 2**20:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        specs = {name: (dtype, shape) for name, shape in shard}
        total += write_safetensors(base / file, specs, ((name, make(name, shape)) for name, shape in shard))
        weight_map.update(dict.fromkeys(specs, file))
    index_file = base / "model.safetensors.index.json"
    index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))

    adapter = run / "adapter"
    adapter.mkdir(parents=True)
    config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, base_model_name_or_path=str(base))
    config.save_pretrained(adapter)
    factors = {}
    for name, shape in base_tensors(s):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            key = f"base_model.model.{module}"
            factors[f"{key}.lora_A.weight"] = (torch.randn([args.r, shape[1]], generator=generator) * 0.02).to(dtype)
            factors[f"{key}.lora_B.weight"] = (torch.randn([shape[0], args.r], generator=generator) * 0.02).to(dtype)
    save_file(factors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(adapter)
    (run / "recipe.yaml").write_text(
        RECIPE.format(base=base, dtype=DTYPES[args.dtype], r=args.r, alpha=2 * args.r, run=run)
    )
    return base, run


def child(method: str, base: Path, run: Path, out: Path, dtype: str) -> None:
    """One merge, then print {"seconds", "peak_rss_mib"} as JSON on the last line."""
    started = time.perf_counter()
    if method in ("default", "no-verify"):
        import logging

        from lora_tune.export import merge

        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        merge(run, out, dtype=dtype, verify=method == "default")
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, DTYPES[dtype]))
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


def run_child(method: str, base: Path, run: Path, out: Path, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(base), str(run), str(out), dtype]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    notes = [line for line in done.stderr.splitlines() if line.startswith(("merge: planned", "verify:"))]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "notes": notes}


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


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench-1g")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count (a slice)")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="of the base and the merge")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--shard-mb", type=int, default=250)
    parser.add_argument("--methods", default="default,no-verify,peft", help="comma-separated, run in this order")
    parser.add_argument("--keep", type=Path, default=None, help="build in this folder and keep it")
    return parser.parse_args()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], *map(Path, sys.argv[3:6]), sys.argv[6])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        build(Path(sys.argv[2]), argparse.Namespace(**json.loads(sys.argv[3])))
        return
    args = parse()
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        root = args.keep or Path(tmp)
        started = time.perf_counter()
        # Built in a subprocess too, so that this process stays small while the merges run.
        settings = {k: getattr(args, k) for k in ("shape", "layers", "hidden", "intermediate", "vocab", "dtype")}
        settings.update(r=args.r, shard_mb=args.shard_mb)
        subprocess.run([sys.executable, __file__, "--build", str(root), json.dumps(settings)], check=True)
        base, run = root / "base", root / "run"
        shards = sorted(base.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in shards)
        s = shape_of(args)
        print(
            f"base: Llama {s['layers']} layers, hidden {s['hidden']}, intermediate {s['intermediate']}, vocab "
            f"{s['vocab']}: {size / 2**30:.2f} GiB {args.dtype} in {len(shards)} shards; LoRA r={args.r} on all "
            f"linear layers of the decoder (built in {time.perf_counter() - started:.0f}s)",
            flush=True,
        )
        results = {}
        for method in methods:
            out = root / f"merged-{method}"
            results[method] = run_child(method, base, run, out, args.dtype)
            seconds, rss = results[method]["seconds"], results[method]["peak_rss_mib"]
            print(f"{method:>9}: {seconds:7.1f} s   peak RSS {rss:6d} MiB", flush=True)
            for note in results[method]["notes"]:
                print(f"           {note}")
            if method == "no-verify" or ("peft" not in methods and not args.keep):
                shutil.rmtree(out, ignore_errors=True)  # disk: one merged copy at a time where nothing compares it
        report(results)
        if "default" in results and "peft" in results:
            diff = logit_difference(root / "merged-default", root / "merged-peft", s["vocab"])
            print(f"max |logit difference| default merge vs peft merge: {diff:.3g}")


def report(results: dict[str, dict]) -> None:
    rss = {m: r["peak_rss_mib"] for m, r in results.items()}
    secs = {m: r["seconds"] for m, r in results.items()}
    if "default" in rss and "peft" in rss:
        print(f"peak RSS default merge (verified) / peft = {rss['default'] / rss['peft']:.2f}   (goal <= 0.33)")
    if "no-verify" in rss and "peft" in rss:
        print(f"peak RSS --no-verify / peft = {rss['no-verify'] / rss['peft']:.2f}")
    if "default" in secs and "no-verify" in secs:
        print(f"wall default / --no-verify = {secs['default'] / secs['no-verify']:.2f}x (the verification's cost)")
    if "default" in secs and "peft" in secs:
        print(f"wall default / peft = {secs['default'] / secs['peft']:.2f}x")


if __name__ == "__main__":
    main()
