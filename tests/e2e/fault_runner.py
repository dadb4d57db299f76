"""Run `lora-tune train` in this process with a fault injected, for tests that need a real process death.

Usage: python -m tests.e2e.fault_runner KIND STEP -- CLI ARGS...
  kill-at-step STEP: SIGKILL this process when step STEP+1 begins (STEP optimizer steps are done).
  kill-in-save STEP: SIGKILL this process while checkpoint-STEP is being written (adapter and optimizer on disk,
                     RNG state and trainer_state not yet).
  kill-after-training STEP: SIGKILL this process once training is over (the final checkpoint sealed) and the
                     adapter is about to be saved; STEP is ignored.
  kill-in-final-save STEP: SIGKILL this process when the adapter is written to .adapter.tmp but not yet renamed
                     into place; STEP is ignored.
  sigterm-in-step STEP: send this process SIGTERM while step STEP+1 runs (a preemption notice mid-step).
The patches live here, not in lora_tune: the product has no test hooks.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    kind, step = sys.argv[1], int(sys.argv[2])
    cli_args = sys.argv[sys.argv.index("--") + 1 :]
    from transformers import Trainer

    if kind == "kill-at-step":
        original = Trainer.training_step

        def training_step(self, *args, **kwargs):  # noqa: ANN001, ANN202
            if self.state.global_step == step:
                _die()
            return original(self, *args, **kwargs)

        Trainer.training_step = training_step
    elif kind == "kill-in-save":
        original_rng = Trainer._save_rng_state

        def save_rng_state(self, output_dir):  # noqa: ANN001, ANN202
            if self.state.global_step == step:
                _die()
            return original_rng(self, output_dir)

        Trainer._save_rng_state = save_rng_state
    elif kind == "sigterm-in-step":
        original = Trainer.training_step

        sent = []

        def training_step(self, *args, **kwargs):  # noqa: ANN001, ANN202
            if self.state.global_step == step and not sent:  # once: a step may be several forward passes
                sent.append(True)
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, *args, **kwargs)

        Trainer.training_step = training_step
    elif kind == "kill-in-final-save":
        import lora_tune.training.lifecycle

        lora_tune.training.lifecycle.replace_dir_atomic = lambda build, target: _die()
    elif kind == "kill-after-training":
        import lora_tune.training.lifecycle

        lora_tune.training.lifecycle.save_artifact_atomically = lambda *args, **kwargs: _die()
    else:
        raise SystemExit(f"unknown fault {kind}")
    from lora_tune.cli import main as cli_main

    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
