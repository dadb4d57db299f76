"""Loading a checkpoint back into a trainer keeps the dtype the adapter trains in.

On a quantized base TRL's SFTTrainer casts the trainable LoRA weights to bfloat16 (the QLoRA paper's setting), but
the Trainer loads a checkpoint (`--resume`, and the best one at the end with `keep_best`) through peft's
`load_adapter`, which upcasts bfloat16 adapter weights to float32. A resumed run then trained float32 weights with a
float32 optimizer state where the uninterrupted run trained bfloat16 ones, and the two drifted apart from the first
step after the resume. Casting back to the dtypes they had before the load is exact: the loaded values are the
bfloat16 values saved in the checkpoint.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import Trainer

# Trainer methods that load adapter weights from a checkpoint folder into the model.
LOADERS = ("_load_from_checkpoint", "_load_best_model")


def trainable_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}


def restore_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> list[str]:
    """Cast the parameters named in `dtypes` back to those dtypes in place (same Parameter objects); the names cast."""
    cast = []
    for name, param in model.named_parameters():
        want = dtypes.get(name)
        if want is not None and param.dtype != want:
            param.data = param.data.to(want)
            cast.append(name)
    return cast


def keep_trainable_dtypes(trainer: Trainer) -> None:
    """Make this trainer's checkpoint loads leave every trainable parameter in the dtype it had before the load."""
    for method in LOADERS:
        original = getattr(trainer, method)

        @functools.wraps(original)
        def load(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            dtypes = trainable_dtypes(trainer.model)
            result = _original(*args, **kwargs)
            restore_dtypes(trainer.model, dtypes)
            return result

        setattr(trainer, method, load)
