"""A run whose loss or trainable weights stop being finite stops there: no NaN checkpoint, no NaN adapter.

The Trainer hides a NaN loss in its logs (`logging_nan_inf_filter` replaces it with the running mean) and trains on;
the NaN reaches the weights through the update, and every later step, checkpoint and the saved adapter are NaN while
the run exits 0. The callback looks at the trainable weights after each optimizer step (for an adapter that is a
small read) and at each logged loss; on the first non-finite value it cancels that step's save and evaluation and
stops training, and `raise_if_diverged` then ends the run with one line naming the step and the last good
checkpoint, which stays the run's result.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tune.errors import LoraTuneError
from lora_tune.training.checkpoints import find_resume_point


class DivergedError(LoraTuneError):
    """Training produced a non-finite loss or weight (exit 1: the run failed, the recipe may be valid)."""

    exit_code = 1


@dataclass
class Divergence:
    step: int | None = None
    what: str = ""


def divergence_callback(found: Divergence) -> Any:
    from transformers import TrainerCallback

    class StopOnNonFinite(TrainerCallback):
        trainable: list[tuple[str, Any]] | None = None  # read once: the set of trainable weights does not change

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001 - transformers' signature
            if found.step is None and model is not None:
                if self.trainable is None:
                    self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                if not all_finite([p for _, p in self.trainable]):  # one device sync per step, not one per weight
                    name = next(n for n, p in self.trainable if not all_finite([p]))
                    found.step, found.what = state.global_step, f"weight {name}"
            return _stop(control) if found.step is not None else control

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - transformers' signature
            loss = (logs or {}).get("loss")
            if found.step is None and isinstance(loss, float) and not math.isfinite(loss):
                found.step, found.what = state.global_step, f"loss {loss}"
            return _stop(control) if found.step is not None else control

    return StopOnNonFinite()


# What torch.multinomial says when a sampling run's logits are no longer finite: weights that a huge update left
# finite but so large that the next generation's logits overflow. An online RL step samples before it trains.
_SAMPLING_BLEW_UP = "probability tensor contains either `inf`, `nan` or element < 0"


@contextmanager
def sampling_divergence(found: Divergence, trainer: Any) -> Iterator[None]:
    """A generation that fails on non-finite probabilities is the run diverging (at the step it was sampling for),
    not a crash: `raise_if_diverged` then says so in one line."""
    try:
        yield
    except RuntimeError as exc:
        if _SAMPLING_BLEW_UP not in str(exc) or found.step is not None:
            raise
        found.step, found.what = trainer.state.global_step + 1, "the sampling probabilities (logits)"


def _stop(control: Any) -> Any:
    control.should_save = False  # a checkpoint of this step would hold the non-finite weights
    control.should_evaluate = False
    control.should_training_stop = True
    return control


def all_finite(params: list[Any]) -> bool:
    """Whether every value of every tensor is finite, read back with a single device synchronisation."""
    import torch

    if not params:
        return True
    flags = [torch.isfinite(p.detach()).all() for p in params]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def raise_if_diverged(found: Divergence, checkpoints: Path, learning_rate: float) -> None:
    if found.step is None:
        return

    last = find_resume_point(checkpoints).checkpoint
    kept = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was saved before it"
    raise DivergedError(
        f"training diverged at step {found.step}: {found.what} is not finite; nothing was saved from that step on "
        f"and {kept}. Lower training.learning_rate (now {learning_rate:g}) or adapter.alpha, or raise "
        "training.warmup_steps, and start again"
    )
