#!/usr/bin/env python
"""Long context on a GPU (issue 34): the longest Llama-3-8B QLoRA row that trains a step, and the 2 x 2,048 peak.

    python scripts/gpu_long_context.py [--gib 24] [--json PATH] [--dry-run]

A Llama-3.1-8B-shaped model with random weights (hidden 4,096, 32 layers, vocabulary 128,256) is written once in
bfloat16 and loaded as `train` loads a QLoRA base (lora_tune.model.load.load_model: NF4, double quantization,
frozen bf16 embeddings/head/norms, non-reentrant checkpointing, the tiled MLP when asked), with the catalog
recipe's adapter (r=16, alpha 32, dropout 0.05, every linear layer) and TRL's chunked LM head, under bf16
autocast as the Trainer runs it. Each trial is one step (forward, backward, optimizer step) of one row of random
tokens; it fits when it raises no CUDA out-of-memory error.

1. Longest context on a `--gib` GPU: torch.cuda.set_per_process_memory_fraction caps the caching allocator at
   `--gib` GiB minus the CUDA context the planner counts (0.6 GiB), so a larger card answers for a smaller one
   (the context itself sits outside the allocator). Bisection in steps of 1,024 tokens, starting around the
   planner's answer, with the long-context levers on (tiled MLP, TRL's activation offloading); a trial's time is
   capped by --trial-budget, and the search stops at --search-budget seconds with the bracket it reached.
2. 2 x 2,048 (two packed rows of 2,048): torch.cuda.max_memory_allocated for the catalog recipe as is, with
   torchtune's adapter (r=8, no dropout) plus the tiled MLP, and the catalog recipe with the levers that
   `lora-tune plan --gpu-memory 7.4GiB` proposes (tiled MLP + offloaded checkpoints), against torchtune's published
   7.4 GiB (RTX 4090).
Each figure is printed beside the planner's (lora_tune.plan) for the same settings. The last line is `RESULT {json}`.

--dry-run: the same code on the CPU with a 2-layer, hidden-64 model and a pretend limit in tokens (no memory is
measured): it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SHAPE_DRY = {**SHAPE_8B, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "head_dim": 16,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}  # fmt: skip
GIB = 1024**3
STEP = 1024
TORCHTUNE_GIB = 7.4
CATALOG_ADAPTER = {"r": 16, "alpha": 32, "dropout": 0.05}
TORCHTUNE_ADAPTER = {"r": 8, "alpha": 16, "dropout": 0.0}
CUDA_CONTEXT_GIB = 0.6  # lora_tune.plan.memory.CUDA_CONTEXT_BYTES


def recipe_for(length: int, batch: int, adapter: dict, levers: dict, dtype: str, name: str = "slice"):  # noqa: ANN201
    from lora_tune.recipe.schema import Recipe

    return Recipe.model_validate(
        {
            "model": {"name": name, "dtype": dtype},
            "quantization": {"bits": 4},
            "adapter": {**adapter, "target_modules": "all-linear"},
            "datasets": [{"path": "rows.jsonl"}],
            "training": {"batch_size": batch, "max_length": length, "optimizer": "paged_adamw_8bit", **levers},
            "output_dir": "runs/long-context",
        }
    )


def planned(shape: dict, length: int, batch: int, adapter: dict, levers: dict) -> dict:
    from lora_tune.plan.memory import estimate
    from lora_tune.plan.shape import shape_from_config

    recipe = recipe_for(length, batch, adapter, levers, "auto")
    parts, _, _, paged = estimate(recipe, shape_from_config({**shape, "model_type": "llama"}))
    total = sum(parts.values())
    allocated = total - parts["overhead"] - parts["fragmentation"] - paged
    return {"total_gib": round(total / GIB, 2), "allocated_gib": round(allocated / GIB, 2)}


def planned_longest(shape: dict, gib: float, adapter: dict, levers: dict) -> int:
    from lora_tune.plan.levers import longest_context
    from lora_tune.plan.shape import shape_from_config

    recipe = recipe_for(2048, 1, adapter, levers, "auto")
    return longest_context(recipe, shape_from_config({**shape, "model_type": "llama"}), int(gib * GIB))


def write_model(folder: Path, shape: dict, cuda: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(folder)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


class Trainer:
    """One model loaded per (adapter, levers); `step(length, batch)` runs one training step and returns its peak."""

    def __init__(self, folder: Path, adapter: dict, levers: dict, cuda: bool) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from trl.trainer.utils import add_fused_lm_head

        from lora_tune.model.load import load_model

        self.cuda = cuda
        recipe = recipe_for(2048, 1, adapter, levers, "bfloat16" if cuda else "float32", str(folder))
        model = load_model(recipe.model, recipe.quantization, recipe.training)
        add_fused_lm_head(model, outputs=("log_probs",))
        config = LoraConfig(
            r=adapter["r"], lora_alpha=adapter["alpha"], lora_dropout=adapter["dropout"], target_modules="all-linear"
        )
        self.model = get_peft_model(model, config)
        for p in self.model.parameters():  # as TRL does for a quantized base
            if p.requires_grad and cuda:
                p.data = p.data.to(torch.bfloat16)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cuda:
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-5)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.offload = levers.get("activation_offloading", False) and cuda
        self.vocab = model.config.vocab_size

    def step(self, length: int, batch: int) -> dict:
        import contextlib

        import torch

        device = "cuda" if self.cuda else "cpu"
        ids = torch.randint(3, self.vocab, (batch, length), device=device)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        offload = contextlib.nullcontext()
        if self.offload:
            from trl.models.activation_offloading import get_act_offloading_ctx_manager

            offload = get_act_offloading_ctx_manager(model=self.model)
        start = time.perf_counter()
        try:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=self.cuda), offload:
                loss = self.model(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=False).loss
            loss.backward()
            self.optimizer.step()
            fits = True
        except torch.OutOfMemoryError:
            fits, loss = False, None
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        result = {"length": length, "batch": batch, "fits": fits, "seconds": round(seconds, 2)}
        if self.cuda:
            torch.cuda.synchronize()
            result["allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            result["reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        del ids, loss
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        return result

    def close(self) -> None:
        import torch

        del self.model, self.optimizer
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def longest(trainer: Trainer, start: int, search_budget: float, dry_limit: int | None) -> dict:
    """Bisection in STEP tokens around `start`; returns the longest length that trained and every trial."""
    trials: list[dict] = []
    began = time.monotonic()

    def fits(length: int) -> bool:
        if dry_limit is not None:
            trials.append({**trainer.step(min(length, 256), 1), "pretend_length": length})
            return length <= dry_limit
        result = trainer.step(length, 1)
        trials.append(result)
        print(f"  {length:>8,} tokens: {'fits' if result['fits'] else 'OOM'} {result}", flush=True)
        return result["fits"]

    low, high = 0, None  # low fits (0: nothing known), high does not
    probe = max(STEP, start // STEP * STEP)
    while high is None:  # bracket: double up from the planner's answer, or halve down
        if time.monotonic() - began > search_budget:
            break
        if fits(probe):
            low, probe = probe, probe * 2
        else:
            high = probe
            while low == 0 and probe > STEP and time.monotonic() - began < search_budget:
                probe = probe // 2 // STEP * STEP or STEP
                if fits(probe):
                    low = probe
                else:
                    high = probe
    while high is not None and high - low > STEP and time.monotonic() - began < search_budget:
        middle = (low + high) // 2 // STEP * STEP
        if fits(middle):
            low = middle
        else:
            high = middle
    done = high is not None and high - low <= STEP
    return {"longest": low, "first_failing": high, "converged": done, "trials": trials}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=24.0, help="the GPU size to answer for (default 24)")
    parser.add_argument("--search-budget", type=float, default=240.0, help="seconds for the bisection")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, pretend limit: checks the script")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device: use --dry-run on the CPU")
    shape = SHAPE_8B if cuda else SHAPE_DRY
    levers = {"tiled_mlp": True, "activation_offloading": True}
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)", "gib": args.gib}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama-8b-shape"
        started = time.monotonic()
        write_model(folder, shape, cuda)
        report["build_s"] = round(time.monotonic() - started, 1)

        # 2 x 2,048: the catalog recipe as is, then torchtune's adapter with the tiled MLP.
        peaks = {}
        for name, adapter, extra in (
            ("catalog recipe", CATALOG_ADAPTER, {"tiled_mlp": False}),
            ("torchtune adapter + tiled MLP", TORCHTUNE_ADAPTER, {"tiled_mlp": True}),
        ):
            trainer = Trainer(folder, adapter, extra, cuda)
            trainer.step(256 if not cuda else 2048, 2)  # warm-up: optimizer state, kernels
            measured = trainer.step(2048 if cuda else 64, 2)
            trainer.close()
            peaks[name] = {"measured": measured, "planned": planned(shape, 2048, 2, adapter, extra)}
            print(f"2 x 2,048, {name}: {measured} planned {peaks[name]['planned']}", flush=True)

        # The catalog recipe with the levers `plan --gpu-memory 7.4GiB` proposes (tiled MLP + offloaded checkpoints):
        # the same model the search below uses, measured before the allocator is capped.
        trainer = Trainer(folder, CATALOG_ADAPTER, levers, cuda)
        trainer.step(256 if not cuda else 2048, 2)
        name = "catalog recipe + tiled MLP + offloaded checkpoints"
        peaks[name] = {
            "measured": trainer.step(2048 if cuda else 64, 2),
            "planned": planned(shape, 2048, 2, CATALOG_ADAPTER, levers),
        }
        print(f"2 x 2,048, {name}: {peaks[name]['measured']} planned {peaks[name]['planned']}", flush=True)
        report["two_by_2048"] = peaks

        # Longest context on a --gib GPU, the levers on.
        start = planned_longest(shape, args.gib, CATALOG_ADAPTER, levers)
        if cuda:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (args.gib - CUDA_CONTEXT_GIB) * GIB / total))
        found = longest(trainer, start, args.search_budget, None if cuda else 5 * STEP + STEP // 2)
        trainer.close()
        report["longest"] = {**found, "planned": start, "levers": levers}
        print(
            f"longest context on {args.gib:g} GiB: {found['longest']:,} tokens trained a step "
            f"(first failing {found['first_failing']}; converged {found['converged']}); planner {start:,}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print("RESULT " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
