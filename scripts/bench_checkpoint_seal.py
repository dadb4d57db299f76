"""Cost of sealing a checkpoint (hashing every file into its manifest) next to the cost of writing it.

Writes a checkpoint-shaped folder (adapter safetensors + an AdamW-like optimizer state, sized for a LoRA of
`--params` trainable parameters), times torch/safetensors writing it, then times `write_manifest` and
`verify_checkpoint` on it, and prints the ratios. Usage: python scripts/bench_checkpoint_seal.py --params 8.8e6
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch
    from safetensors.torch import save_file

    from lora_tune.training.checkpoints import verify_checkpoint, write_manifest

    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=8.8e6, help="trainable parameters (Qwen2.5-0.5B, r=16: 8.8M)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = int(args.params)
    chunks = [torch.randn(min(n - i, 1 << 20)) for i in range(0, n, 1 << 20)]
    writes, seals, verifies = [], [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "checkpoint-1"
            folder.mkdir()
            start = time.perf_counter()
            save_file({f"w{i}": c for i, c in enumerate(chunks)}, folder / "adapter_model.safetensors")
            torch.save(
                {"state": {i: {"exp_avg": c, "exp_avg_sq": c.clone()} for i, c in enumerate(chunks)}},
                folder / "optimizer.pt",
            )
            (folder / "trainer_state.json").write_text("{}")
            writes.append(time.perf_counter() - start)
            start = time.perf_counter()
            write_manifest(folder, 1)
            seals.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert verify_checkpoint(folder) is None
            verifies.append(time.perf_counter() - start)
            size = sum(p.stat().st_size for p in folder.iterdir())
    write, seal, verify = min(writes), min(seals), min(verifies)
    print(f"checkpoint of {n:,} trainable parameters: {size / 2**20:.0f} MiB on disk (best of {args.repeat})")
    print(f"  write (safetensors + torch.save): {write:.3f} s")
    print(f"  seal (hash into manifest):        {seal:.3f} s   = {seal / write:.2f}x the write")
    print(f"  verify on resume:                 {verify:.3f} s   = {verify / write:.2f}x the write")


if __name__ == "__main__":
    main()
