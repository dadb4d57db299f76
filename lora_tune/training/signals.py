"""Graceful stop on SIGTERM / SIGINT: finish the current optimizer step, write a checkpoint, exit with a hint.

Schedulers and spot instances send SIGTERM (Ctrl-C sends SIGINT) and usually wait a little before SIGKILL. The first
signal sets a flag; a TrainerCallback sees it at the end of the step in progress and asks the Trainer to save and
stop. A second signal exits at once (the checkpoint being written is then ignored on resume: it has no manifest).
Exit status is 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as shells report a signalled process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lora_tune.errors import LoraTuneError

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(LoraTuneError):
    """Training stopped on a signal after saving a checkpoint; exit status 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """The signal received (if any); shared between the handler and the callback."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        if self.signum is not None:
            # A second signal: the user (or the scheduler) will not wait; leave now, without cleanup.
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting at once (no checkpoint written)\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(
            f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
            "(send it again to exit at once)\n"
        )
        sys.stderr.flush()


def stop_callback(request: StopRequest) -> Any:
    """A TrainerCallback that turns a pending stop request into save-and-stop at the end of the current step."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers' signature
            if request.signum is not None:
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopOnSignal()


@contextmanager
def graceful_stop(request: StopRequest) -> Iterator[StopRequest]:
    """Install the handlers for the duration of training (main thread only; elsewhere signals stay as they were)."""
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in HANDLED}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def raise_if_stopped(request: StopRequest, step: int, checkpoint_dir: str, resume_hint: str) -> None:
    """After `trainer.train()` returned: if it returned because of a signal, say where it stopped and how to go on."""
    if request.signum is None:
        return
    raise TrainingInterrupted(
        f"stopped by {request.name} after step {step}; checkpoint saved in {checkpoint_dir}. "
        f"Resume with: {resume_hint}",
        request.signum,
    )
