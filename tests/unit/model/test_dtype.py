"""A checkpoint load (resume, best checkpoint) leaves the trainable weights in the dtype they trained in."""

from __future__ import annotations

import torch

from lora_tune.model.dtype import keep_trainable_dtypes


class FakeTrainer:
    """Loads "checkpoint" weights the way peft's load_adapter does: the values, then an upcast to float32."""

    def __init__(self) -> None:
        layers = {"lora_A": torch.nn.Linear(4, 2, bias=False), "frozen": torch.nn.Linear(4, 2)}
        self.model = torch.nn.ModuleDict(layers)
        self.model["lora_A"].to(torch.bfloat16)
        self.model["frozen"].requires_grad_(False)
        self.saved = torch.randn(2, 4).to(torch.bfloat16)
        self.calls: list[str] = []

    def _load(self, name: str) -> str:
        self.calls.append(name)
        with torch.no_grad():
            self.model["lora_A"].weight.copy_(self.saved)
        self.model.to(torch.float32)
        return name

    def _load_from_checkpoint(self, checkpoint: str, model: object = None) -> str:
        return self._load("checkpoint")

    def _load_best_model(self) -> str:
        return self._load("best")


def test_both_loaders_cast_the_trainable_weights_back_to_their_training_dtype():
    trainer = FakeTrainer()
    weight = trainer.model["lora_A"].weight
    keep_trainable_dtypes(trainer)

    assert trainer._load_from_checkpoint("checkpoint-6") == "checkpoint"
    assert weight.dtype == torch.bfloat16 and trainer.model["lora_A"].weight is weight  # the optimizer's object
    assert torch.equal(weight, trainer.saved)  # exact: the saved values were bfloat16
    assert trainer._load_best_model() == "best"
    assert weight.dtype == torch.bfloat16
    assert trainer.model["frozen"].weight.dtype == torch.float32  # frozen weights are the loader's business
    assert trainer.calls == ["checkpoint", "best"]
