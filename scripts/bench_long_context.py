#!/usr/bin/env python
"""Long-context memory levers on a Llama-3-8B-wide slice: peak memory of one training step, before and after each.

    python scripts/bench_long_context.py [--lengths 4096,8192] [--layers 1] [--vocab 8192] [--no-frozen]

The slice has Llama 3 8B's full width (hidden 4,096, intermediate 14,336, 32 query / 8 key-value heads of 128) and
`--layers` decoder layers with random weights, loaded as `train` loads a QLoRA base (lora_tune.model.load.load_model:
NF4 with double quantization, non-reentrant gradient checkpointing), LoRA r=16, alpha 32, dropout 0.05 on every
linear layer (the 8B catalog recipe's adapter), one step of a packed-style single row (batch 1) of each length:
forward, backward, AdamW step. Each configuration runs in its own process; its peak is the process's peak resident
memory (VmHWM, reset after loading) minus its resident memory after loading: the step's working set.

Configurations, each adding one lever to the one before (one row per length):
  full logits    transformers' own loss over the whole (tokens x vocab) float32 logits
  chunked loss   TRL's chunked LM head (lora-tune's default): no full logits
  tiled MLP      + training.tiled_mlp (lora_tune.model.tiling)
  eager attention  chunked loss with eager attention instead of SDPA (the SDPA lever, seen from its absence)
The per-token working set of a configuration is the slope of its working set between the two lengths; the
headline is the ratio of the per-token working sets before and after the tiled MLP, printed with the planner's
figures for the same slice (lora_tune.plan.memory, the same recipe, the slice's config).

Frozen bfloat16 weights: this CPU computes bfloat16 matmuls at a few GFLOPS (no AVX512-BF16), too slow for a step
at these lengths, so that lever is measured on loading: the slice with Llama 3's real 128,256-token vocabulary in
bfloat16, NF4 layers, prepared by peft (float32 embeddings, LM head, norms) and by lora-tune (kept bfloat16): the
frozen bytes and the resident memory after loading. Eager attention keeps 32 x L^2 float32 scores per layer
(2 GiB at 4,096 tokens): measure it at shorter lengths (--lengths 1024,2048).

Offloaded checkpoints move the tensors saved for backward outside the checkpointed layers to CPU RAM; on the CPU
they would stay in the same RAM, so the step cannot show the saving. What every step child measures instead is what
TRL's offloading would move: the bytes of the tensors saved for backward that its rule takes (1,024 bytes or more,
not a parameter or a parameter's storage, each storage once), counted by a saved-tensors hook outside
the checkpoints, printed beside the planner's saving (its activations without offloading minus with).

The compute is float32 (bfloat16 is too slow here, above), so activations take 4 bytes where a GPU run takes 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "model_type": "llama",
}
LLAMA3_VOCAB = 128256
CONFIGS = ("full logits", "chunked loss", "tiled MLP", "eager attention")
GIB, MIB = 1024**3, 1024**2


def slice_config(layers: int, vocab: int) -> dict:
    return {**WIDTH, "num_hidden_layers": layers, "vocab_size": vocab, "architectures": ["LlamaForCausalLM"]}


def write_slice(folder: Path, layers: int, vocab: int, dtype: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = {k: v for k, v in slice_config(layers, vocab).items() if k not in ("model_type", "architectures")}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in its dtype: no float32 copy of a 128k vocabulary
    try:
        model = LlamaForCausalLM(LlamaConfig(**config))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    return folder


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def child_step(folder: str, config: str, length: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_tune.model.load import load_model
    from lora_tune.recipe.schema import ModelConfig, QuantizationConfig, TrainingConfig

    training = TrainingConfig(max_length=length, batch_size=1, tiled_mlp=config == "tiled MLP")
    attention = "eager" if config == "eager attention" else "sdpa"
    model_cfg = ModelConfig(name=folder, dtype="float32", attn_implementation=attention)
    model = load_model(model_cfg, QuantizationConfig(bits=4), training)
    if config != "full logits":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs",))
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    loaded = status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    kwargs = {"fused_lm_head": True} if config != "full logits" else {}
    with OffloadCounter(model) as offloadable:
        loss = model(input_ids=ids, labels=ids, use_cache=False, **kwargs).loss
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    result = {"loaded": loaded, "peak": status("VmHWM"), "seconds": seconds, "loss": loss.item()}
    return {**result, "offloadable": offloadable.bytes}


class OffloadCounter:
    """A saved-tensors hook, outside the checkpointed layers, that counts the bytes TRL's activation offloading
    would move to CPU RAM (trl.models.activation_offloading: 1,024 bytes or more, not a parameter, not a
    parameter's storage, each storage once) and keeps every tensor where it is."""

    def __init__(self, model) -> None:
        import torch

        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, tensor):
        import torch

        size = tensor.untyped_storage().nbytes()
        storage = tensor.untyped_storage().data_ptr()
        moved = size >= 1024 and not isinstance(tensor, torch.nn.Parameter) and storage not in self.parameters
        if moved and storage not in self.seen:
            self.seen.add(storage)
            self.bytes += size
        return tensor

    def __enter__(self) -> OffloadCounter:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)


def child_frozen(folder: str, preparation: str) -> dict:
    import torch

    from lora_tune.model.kbit import frozen_unquantized_bytes
    from lora_tune.model.load import load_model
    from lora_tune.recipe.schema import ModelConfig, QuantizationConfig, TrainingConfig

    if preparation == "peft":  # load_model's preparation replaced by peft's, for comparison
        from peft import prepare_model_for_kbit_training

        import lora_tune.model.load as load

        load.prepare_for_kbit_training = lambda model, gradient_checkpointing: prepare_model_for_kbit_training(
            model, gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    training = TrainingConfig(max_length=2048, batch_size=1, tiled_mlp=False)
    model = load_model(ModelConfig(name=folder, dtype="bfloat16"), QuantizationConfig(bits=4), training)
    residual = model.get_input_embeddings()(torch.tensor([[5]])).dtype
    return {"rss": status("VmRSS"), "frozen": frozen_unquantized_bytes(model), "residual": str(residual)}


def run_child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def planner(
    layers: int,
    vocab: int,
    length: int,
    tiled: bool,
    attention: str = "sdpa",
    offloading: bool = False,
    full_logits: bool = False,
) -> dict[str, int]:
    """The planner's parts for the same slice and recipe (float32 compute on the CPU: dtype float32)."""
    from lora_tune.plan.memory import FULL_LOGITS, estimate
    from lora_tune.plan.shape import shape_from_config
    from lora_tune.recipe.schema import Recipe

    recipe = Recipe.model_validate(
        {
            "model": {"name": "slice", "dtype": "float32", "attn_implementation": attention},
            "quantization": {"bits": 4},
            "adapter": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "datasets": [{"path": "slice.jsonl"}],
            "training": {
                "batch_size": 1,
                "max_length": length,
                "optimizer": "adamw_torch",
                "tiled_mlp": tiled,
                "activation_offloading": offloading,
            },
            "output_dir": "runs/slice",
        }
    )
    without = frozenset({FULL_LOGITS}) if full_logits else frozenset()
    return estimate(recipe, shape_from_config(slice_config(layers, vocab)), without)[0]


def planned_step(parts: dict[str, int]) -> int:
    """What the measured figure holds: the step's tensors (activations, backward working set, gradients, optimizer
    state); not the weights, adapter, CUDA context or allocator slack."""
    return parts["activations"] + parts["backward working set"] + parts["gradients"] + parts["optimizer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which of: " + ", ".join(CONFIGS))
    parser.add_argument("--no-frozen", action="store_true", help="skip the frozen-weights load measurement")
    parser.add_argument("--frozen-only", action="store_true", help="only the frozen-weights load measurement")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_step(rest[0], rest[1], int(rest[2])) if kind == "step" else child_frozen(rest[0], rest[1])
        print(json.dumps(result))
        return
    lengths = [int(n) for n in args.lengths.split(",")]
    configs = [] if args.frozen_only else [c.strip() for c in args.configs.split(",")]
    print(
        f"slice: Llama-3-8B width (hidden 4,096, intermediate 14,336, 32/8 heads), {args.layers} layer(s), "
        f"vocab {args.vocab:,}, random weights, NF4 + LoRA r=16 all-linear, float32 compute, batch 1",
        flush=True,
    )
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_slice(Path(tmp) / "slice", args.layers, args.vocab, "float32") if configs else None
        for length in lengths if configs else []:
            for config in configs:
                r = run_child("step", str(folder), config, str(length))
                results[config, length] = r
                print(
                    f"  {config:<13} {length:>6,} tokens: working set {(r['peak'] - r['loaded']) / GIB:6.2f} GiB "
                    f"(loaded {r['loaded'] / GIB:.2f}, peak {r['peak'] / GIB:.2f}), {r['seconds']:6.0f} s, "
                    f"loss {r['loss']:.6f}",
                    flush=True,
                )
        frozen = {}
        if not args.no_frozen:
            big = write_slice(Path(tmp) / "frozen", args.layers, LLAMA3_VOCAB, "bfloat16")
            for preparation in ("peft", "lora-tune"):
                frozen[preparation] = run_child("frozen", str(big), preparation)
    report(results, frozen, lengths, configs, args.layers, args.vocab)


def report(results: dict, frozen: dict, lengths: list[int], configs: list[str], layers: int, vocab: int) -> None:
    if configs:
        print("\nPer configuration: measured step working set against the planner's (activations + backward")
        print("working set + LoRA gradients + optimizer state, float32), and the per-token slope between the lengths.")
    slopes = {}
    for config in configs:
        tiled, attention = config == "tiled MLP", "eager" if config == "eager attention" else "sdpa"
        measured = {n: results[config, n]["peak"] - results[config, n]["loaded"] for n in lengths}
        full = config == "full logits"
        planned = {n: planned_step(planner(layers, vocab, n, tiled, attention, full_logits=full)) for n in lengths}
        for n in lengths:
            print(
                f"  {config:<13} {n:>6,}: measured {measured[n] / GIB:6.2f} GiB, planned {planned[n] / GIB:6.2f} GiB "
                f"({planned[n] / measured[n] - 1:+.0%})"
            )
        if len(lengths) > 1:
            a, b = lengths[0], lengths[-1]
            slope = (measured[b] - measured[a]) / (b - a)
            planned_slope = (planned[b] - planned[a]) / (b - a)
            slopes[config] = slope
            print(f"  {config:<13} per token: measured {slope / 1024:.0f} KiB, planned {planned_slope / 1024:.0f} KiB")
    report_ratios(results, lengths, slopes)
    report_offloadable(results, lengths, configs, layers, vocab)
    if frozen:
        p, o = frozen["peft"], frozen["lora-tune"]
        pb, ob = sum(p["frozen"].values()), sum(o["frozen"].values())
        print(
            f"\nfrozen embeddings, LM head, norms (vocab {LLAMA3_VOCAB:,}, {layers} layer(s)): peft's preparation "
            f"{pb / GIB:.2f} GiB {p['frozen']} (residual stream {p['residual']}), lora-tune's {ob / GIB:.2f} GiB "
            f"(residual {o['residual']}): {pb / ob:.2f}x; resident after loading {p['rss'] / GIB:.2f} -> "
            f"{o['rss'] / GIB:.2f} GiB"
        )


def report_ratios(results: dict, lengths: list[int], slopes: dict[str, float]) -> None:
    """Each lever's saving against the configuration that lacks it: per-token slopes and each length's step."""
    a, b = lengths[0], lengths[-1]
    for without, with_it in (
        ("full logits", "chunked loss"),
        ("chunked loss", "tiled MLP"),
        ("eager attention", "chunked loss"),
    ):
        if without in slopes and with_it in slopes:
            print(f"\nper-token working set, {without} / {with_it}: {slopes[without] / slopes[with_it]:.2f}x")
            for n in (a, b):
                r0, r1 = results[without, n], results[with_it, n]
                w0, w1 = r0["peak"] - r0["loaded"], r1["peak"] - r1["loaded"]
                print(
                    f"  at {n:,} tokens: working set {w0 / GIB:.2f} -> {w1 / GIB:.2f} GiB ({w0 / w1:.2f}x), "
                    f"step time {r1['seconds'] / r0['seconds']:.2f}x ({r0['seconds']:.0f} s -> {r1['seconds']:.0f} s)"
                )


def report_offloadable(results: dict, lengths: list[int], configs: list[str], layers: int, vocab: int) -> None:
    """What offloaded checkpoints would move per step, counted, beside the planner's saving from that lever."""
    config = "chunked loss" if "chunked loss" in configs else configs[0] if configs else None
    if config is None:
        return
    print(f"\noffloaded checkpoints ({config}): bytes TRL's offloading would move to CPU RAM, counted in the step")
    for n in lengths:
        counted = results[config, n]["offloadable"]
        without = planner(layers, vocab, n, False)["activations"]
        saving = without - planner(layers, vocab, n, False, offloading=True)["activations"]
        print(
            f"  {n:>6,} tokens: counted {counted / MIB:8.1f} MiB; planner's activations {without / MIB:.1f} MiB "
            f"without offloading, saving {saving / MIB:.1f} MiB with it (it keeps one layer's input in flight)"
        )


if __name__ == "__main__":
    main()
