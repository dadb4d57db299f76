"""Run-time speed levers: attention choice, optimizer choice, packed batch shape on the CPU, Liger refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.model import attention
from lora_tune.recipe.schema import Recipe
from lora_tune.training import levers as speed


def recipe(model: dict | None = None, quantization: dict | None = None, **training) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"name": "m", **(model or {})},
            "quantization": quantization or {},
            "datasets": [{"path": "d.jsonl"}],
            "output_dir": "o",
            "training": training,
        }
    )


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """Pretend to be on a CUDA GPU of a given compute capability with given packages installed."""
    import torch

    def install(capability: tuple[int, int], packages: set[str]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
        monkeypatch.setattr(attention, "is_installed", lambda name: name in packages)

    return install


def test_auto_attention_is_sdpa_on_the_cpu_and_says_why():
    import torch

    choice = attention.resolve_attention("auto", torch.float32)
    assert choice.value == "sdpa" and "no CUDA GPU" in choice.reason
    assert attention.resolve_attention("eager", torch.float32).value == "eager"


@pytest.mark.parametrize(
    ("capability", "packages", "dtype", "expected", "why"),
    [
        ((9, 0), {"flash_attn_interface", "flash_attn"}, "bfloat16", "flash_attention_3", "Hopper"),
        ((9, 0), {"flash_attn"}, "bfloat16", "flash_attention_2", "Ampere or newer"),
        ((8, 6), {"flash_attn"}, "float16", "flash_attention_2", "sm_86"),
        ((8, 6), set(), "bfloat16", "sdpa", "not installed"),
        ((7, 5), {"flash_attn"}, "float16", "sdpa", "older than Ampere"),
        ((8, 0), {"flash_attn"}, "float32", "sdpa", "needs 16-bit"),
    ],
)
def test_auto_attention_on_gpus(fake_gpu, capability, packages, dtype, expected, why):
    import torch

    fake_gpu(capability, packages)
    choice = attention.resolve_attention("auto", getattr(torch, dtype))
    assert choice.value == expected and why in choice.reason


def test_auto_optimizer():
    qlora = recipe(quantization={"bits": 4})
    assert speed.resolve_optimizer(qlora, on_gpu=True).value == "paged_adamw_8bit"
    assert speed.resolve_optimizer(qlora, on_gpu=False).value == "adamw_torch"
    assert speed.resolve_optimizer(recipe(), on_gpu=True).value == "adamw_torch"
    assert speed.resolve_optimizer(recipe(optimizer="adafactor"), on_gpu=True).value == "adafactor"


def test_packed_rows_go_one_per_forward_pass_on_the_cpu_only():
    r = recipe(batch_size=4, gradient_accumulation_steps=2, max_length=512)
    cpu = speed.batch_shape(r, packed=True, attention="sdpa", on_gpu=False)
    assert (cpu.batch_size, cpu.gradient_accumulation_steps, cpu.eval_batch_size) == (1, 8, 1) and cpu.reason
    for kwargs in (
        {"packed": True, "attention": "sdpa", "on_gpu": True},
        {"packed": True, "attention": "flash_attention_2", "on_gpu": False},
        {"packed": False, "attention": "sdpa", "on_gpu": False},
    ):
        same = speed.batch_shape(r, **kwargs)
        assert (same.batch_size, same.gradient_accumulation_steps, same.reason) == (4, 2, None)


def test_sft_config_on_the_cpu_with_defaults(tmp_path: Path):
    import torch

    from lora_tune.training.trl_args import to_sft_config

    config = to_sft_config(recipe(quantization={"bits": 4}), tmp_path, torch.float32)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (1, 4)
    assert config.optim == "adamw_torch" and config.packing and config.padding_free
    assert config.activation_offloading is False
    kwargs = getattr(config, "gradient_checkpointing_kwargs", None) or config.activation_checkpointing_kwargs
    assert kwargs == {"use_reentrant": False}
    unpacked = to_sft_config(recipe(packing=False), tmp_path, torch.float32)
    assert (unpacked.per_device_train_batch_size, unpacked.gradient_accumulation_steps) == (4, 1)


def test_liger_on_the_cpu_is_refused_before_any_work(tmp_path: Path, capsys):
    from lora_tune.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {{name: {tmp_path / 'no-model'}}}\ndatasets: [{{path: {tmp_path / 'd.jsonl'}}}]\n"
        f"training: {{liger: true}}\noutput_dir: {tmp_path / 'run'}\n"
    )
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: training.liger:") and "CUDA GPU" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_describe_levers_is_one_line():
    import torch

    line = speed.describe_levers(recipe(quantization={"bits": 4}), torch.float32)
    assert "attention sdpa (no CUDA GPU" in line and "optimizer adamw_torch" in line
    assert "packed rows one per forward pass" in line and "\n" not in line
