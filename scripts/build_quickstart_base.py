#!/usr/bin/env python
"""Build the quickstart's tiny base model: pre-train it from scratch on a made-up world (about a minute on a CPU).

    python scripts/build_quickstart_base.py [--output runs/quickstart-base] [--force] [--steps N] [--seed S]

An existing base is kept as it is (the build is deterministic, so rebuilding gives the same model on the same
machine); `--force` rebuilds it. A folder that holds anything else is refused, and nothing in it is deleted.
See `lora_tune/quickstart/world.py` for the world, the corpus and the SFT data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/quickstart-base", help="folder to write (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder exists")
    parser.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the quickstart's)")
    parser.add_argument("--seed", type=int, default=None, help="seed of initialisation and batches (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from lora_tune.quickstart import world as quickstart
    from lora_tune.run.outputs import OutputError

    output = Path(args.output)
    if quickstart.is_quickstart_base(output) and not args.force:
        print(f"{output} exists: keeping it (--force rebuilds it)")
        return 0
    seed = quickstart.SEED if args.seed is None else args.seed
    print(f"Pre-training the quickstart base into {output} ...", flush=True)
    try:
        quickstart.build_base(output, steps=args.steps, seed=seed, progress=not args.no_progress, overwrite=args.force)
    except OutputError as exc:  # a folder that is not a base it may replace: one line, nothing deleted
        print(f"error: {exc.render('--output') if exc.option == 'out_dir' else exc}", file=sys.stderr)
        return 2
    info = quickstart.read_base_info(output)
    shape = info["model"]
    print(
        f"Built {output}: Llama, {info['parameters'] / 1e6:.2f}M parameters ({shape['num_layers']} layers, "
        f"hidden {shape['hidden_size']}, vocab {info['vocab_size']}), {info['pretraining']['steps']} steps on "
        f"{info['documents']} documents about {info['countries']} countries, final loss {info['final_loss']:.3f}, "
        f"{info['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
