#!/usr/bin/env python
"""Training throughput: lora-tune with its defaults vs a plain transformers + peft + TRL SFTTrainer baseline.

    python scripts/bench_train.py [--device auto|cpu|cuda] [--rows N] [--repeats R] [--json FILE]

Both sides train the same base model for one epoch on the same variable-length chat data (gamma-distributed
lengths), with the same batch size, max_length, learning rate and LoRA shape; each run is a fresh subprocess, and the
sides alternate (lora-tune, baseline, lora-tune, baseline...) so that machine load hits both alike. For each run:
real (non-pad) tokens per second of the training loop (Trainer's train_runtime), the padding fraction of the batches
the model saw (counted in TRL's collator), peak memory (RSS on the CPU, torch.cuda.max_memory_allocated on a GPU) and
the last logged training loss; then the ratios of the medians.

- lora-tune: `lora_tune.train(recipe)` with a recipe that sets only the model, the data, max_length and the epoch
  count: padding-free packing, packed rows one per forward pass on the CPU, auto attention/optimizer.
- baseline: the tutorial script: `SFTTrainer(model, args=SFTConfig(per_device_train_batch_size=B, max_length=L,
  learning_rate=2e-4, ...), train_dataset=messages, peft_config=LoraConfig(all-linear))`: each batch padded to its
  longest example. (SFTConfig's own bf16 default is turned off on the CPU, where it would only slow the baseline.)
  TRL's chunked LM-head loss is on for both.
Losses are not comparable one to one: lora-tune trains assistant tokens only and takes fewer, fuller optimizer steps.

CPU: a 4-layer, hidden-256 Llama (~5M parameters) and LoRA on a float32 base. CUDA: a Llama-3-8B-shaped model with
random weights (values do not change speed or memory) at max_length 2048, QLoRA (NF4) on both sides, plus the model
FLOPs utilisation against this GPU's measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("lora-tune", "baseline")
CPU = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 4, "intermediate": 1024, "vocab": 0, "max_length": 512}
CPU.update(batch_size=4, mean_words=60, rows=480)
CUDA = {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 128256}
CUDA.update(max_length=2048, batch_size=4, mean_words=500, rows=512)


def build_assets(root: Path, shape: dict, rows: int, cuda: bool) -> None:
    """Tokenizer, random base model and a chat set of gamma-distributed lengths, written under `root`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_tune.quickstart.tiny import build_tokenizer

    rng = random.Random(0)
    words = [f"{a}{b}" for a in "bcdfghjklmnprstvz" for b in ("a", "e", "i", "o", "u", "an", "er", "in", "on")]
    tokenizer = build_tokenizer([" ".join(rng.sample(words, len(words))) for _ in range(50)], vocab_size=600)
    config = LlamaConfig(
        vocab_size=shape["vocab"] or len(tokenizer),
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=max(4096, shape["max_length"]),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    del model
    with (root / "data.jsonl").open("w") as out:
        for _ in range(rows):
            n = max(3, int(rng.gammavariate(2.0, shape["mean_words"] / 2.0)))
            question = " ".join(rng.choice(words) for _ in range(max(2, n // 4)))
            answer = " ".join(rng.choice(words) for _ in range(n))
            row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            out.write(json.dumps(row) + "\n")


def count_batches() -> dict[str, int]:
    """Count real and padded token positions of every batch TRL's collator builds in this process."""
    from trl.trainer import sft_trainer

    counts = {"real": 0, "positions": 0}
    collate = sft_trainer.DataCollatorForLanguageModeling.__call__

    def counting(self, examples):  # noqa: ANN001, ANN202 - the collator's own signature
        batch = collate(self, examples)
        counts["positions"] += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        counts["real"] += int(mask.sum()) if mask is not None else sum(len(e["input_ids"]) for e in examples)
        return batch

    sft_trainer.DataCollatorForLanguageModeling.__call__ = counting
    return counts


def run_lora_tune(root: Path, shape: dict, cuda: bool) -> tuple[float, float | None]:
    from lora_tune import train
    from lora_tune.recipe.load import load_recipe

    recipe = root / "lora-tune.yaml"
    quant = "quantization: {bits: 4}\n" if cuda else ""
    recipe.write_text(
        f"model: {{name: {root / 'model'}}}\n{quant}datasets: [{{path: {root / 'data.jsonl'}}}]\n"
        f"training: {{num_epochs: 1, batch_size: {shape['batch_size']}, max_length: {shape['max_length']}, "
        "save_strategy: 'no', logging_steps: 5}\npreflight: {on_failure: warn}\n"
        f"output_dir: {root / 'run-lora-tune'}\n"
    )
    result = train(load_recipe(recipe), overwrite=True)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    runtime = next(r["train_runtime"] for r in reversed(records) if "train_runtime" in r)
    return runtime, result.train_loss


def run_baseline(root: Path, shape: dict, cuda: bool) -> tuple[float, float | None]:
    """The tutorial script: load (4-bit on a GPU), LoraConfig, SFTConfig, SFTTrainer, train."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    model_dir = str(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    quant = None
    if cuda:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.bfloat16 if cuda else torch.float32
    )
    args = SFTConfig(
        output_dir=str(root / "run-baseline"),
        num_train_epochs=1,
        per_device_train_batch_size=shape["batch_size"],
        max_length=shape["max_length"],
        learning_rate=2e-4,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        **({} if cuda else {"bf16": False, "use_cpu": True}),
    )
    peft_config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    dataset = load_dataset("json", data_files=str(root / "data.jsonl"), split="train")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    output = trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return output.metrics["train_runtime"], losses[-1] if losses else None


def child(side: str, root: Path, shape: dict, cuda: bool) -> dict:
    import torch

    counts = count_batches()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runtime, loss = (run_lora_tune if side == "lora-tune" else run_baseline)(root, shape, cuda)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        status = Path("/proc/self/status").read_text()
        peak = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) / 2**20
    return {"runtime": runtime, "loss": loss, "peak_gib": peak, **counts}


def matmul_peak_tflops() -> float:
    """This GPU's bf16 matmul throughput (8192^3 GEMMs), the denominator of the FLOPs utilisation."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - start) / 1e12


def model_flops_per_token(shape: dict, seq: int) -> float:
    """LoRA training FLOPs per token: forward 2N + backward through frozen weights 2N (no weight gradients), plus
    attention (4 * seq * hidden per layer forward, twice that backward, half of it masked by causality)."""
    h, i, layers = shape["hidden"], shape["intermediate"], shape["layers"]
    kv = h * shape["kv_heads"] // shape["heads"]
    n = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * shape["vocab"]
    return 4 * n + 3 * layers * 2 * seq * h


def summarise(runs: dict[str, list[dict]], shape: dict, cuda: bool, peak_tflops: float | None) -> dict:
    table = {}
    for side, items in runs.items():
        rates = [r["real"] / r["runtime"] for r in items]
        table[side] = {
            "real_tokens_per_s": statistics.median(rates),
            "runs_tokens_per_s": [round(x) for x in rates],
            "padding_fraction": 1 - items[0]["real"] / items[0]["positions"],
            "peak_gib": statistics.median(r["peak_gib"] for r in items),
            "final_loss": items[-1]["loss"],
            "real_tokens": items[0]["real"],
        }
        if cuda and peak_tflops:
            achieved = table[side]["real_tokens_per_s"] * model_flops_per_token(shape, shape["max_length"]) / 1e12
            table[side]["mfu"] = achieved / peak_tflops
    return table


def print_table(table: dict, device: str) -> None:
    mem = "peak GPU allocated" if device == "cuda" else "peak RSS"
    print(
        f"\n| side | real tokens/s (median; runs) | padding | {mem} | final loss |"
        + (" MFU |" if device == "cuda" else "")
    )
    print("|---|---|---|---|---|" + ("---|" if device == "cuda" else ""))
    for side, r in table.items():
        runs = ", ".join(f"{x:,}" for x in r["runs_tokens_per_s"])
        mfu = f" {r['mfu']:.1%} |" if "mfu" in r else ""
        loss = f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "n/a"
        print(
            f"| {side} | {r['real_tokens_per_s']:,.0f} ({runs}) | {r['padding_fraction']:.1%} | "
            f"{r['peak_gib']:.2f} GiB | {loss} |{mfu}"
        )
    a, b = table["lora-tune"], table["baseline"]
    print(
        f"\nratios (lora-tune / baseline): real tokens/s {a['real_tokens_per_s'] / b['real_tokens_per_s']:.2f}x, "
        f"peak memory {a['peak_gib'] / b['peak_gib']:.2f}x; padding {a['padding_fraction']:.1%} vs "
        f"{b['padding_fraction']:.1%}; real tokens per epoch {a['real_tokens']:,} vs {b['real_tokens']:,}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--rows", type=int, default=None, help="chats in the data set (default: per device)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternating (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads per run (default 1: steadier on a shared machine)"
    )
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "ROOT", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        side, root, device = args.child
        shape = json.loads((Path(root) / "shape.json").read_text())
        print("RESULT " + json.dumps(child(side, Path(root), shape, device == "cuda")), flush=True)
        return 0

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    shape = dict(CUDA if device == "cuda" else CPU)
    rows = args.rows or shape["rows"]
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_assets(root, shape, rows, device == "cuda")
        (root / "shape.json").write_text(json.dumps(shape))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if device == "cpu":
            env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads in each run
        for repeat in range(args.repeats):
            for side in SIDES:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", side, str(root), device],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
                    raise SystemExit(f"{side} run {repeat + 1} failed (exit {proc.returncode})")
                runs[side].append(json.loads(lines[-1].removeprefix("RESULT ")))
                r = runs[side][-1]
                print(f"run {repeat + 1} {side}: {r['real'] / r['runtime']:,.0f} real tokens/s", flush=True)
    peak = matmul_peak_tflops() if device == "cuda" else None
    table = summarise(runs, shape, device == "cuda", peak)
    import peft
    import transformers
    import trl

    gpu = f" ({torch.cuda.get_device_name(0)}, bf16 matmul peak {peak:.0f} TFLOP/s)" if peak else ""
    print(
        f"\ndevice {device}{gpu}"
        f"; {os.cpu_count()} CPUs ({args.threads} thread(s) per CPU run); torch {torch.__version__}, "
        f"transformers {transformers.__version__}, "
        f"peft {peft.__version__}, trl {trl.__version__}; model {shape}; {rows} chats"
    )
    print_table(table, device)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "shape": shape, "rows": rows, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
