"""Refuse what is unsafe: pickle-only weights, silent remote code, hub tokens leaking into anything a run writes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_tune.model.load import load_model
from lora_tune.model.safety import UnsafeModelError
from lora_tune.recipe.schema import ModelConfig, QuantizationConfig, TrainingConfig
from lora_tune.run.secrets import MASK, install_log_redaction, redact
from tests.helpers import ROOT
from tests.helpers import write_resume_recipe as write_recipe

TOKEN = "hf_" + "PlantedSecretToken0123456789abcdefXYZ"


@pytest.fixture(scope="module")
def pickle_only_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("pickle-only")
    for item in tiny_model_dir.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, out / item.name)
    # transformers 5 only writes safetensors; an older-style pickle checkpoint is made by hand.
    torch.save(load_file(tiny_model_dir / "model.safetensors"), out / "pytorch_model.bin")
    assert (out / "pytorch_model.bin").is_file() and not list(out.glob("*.safetensors"))
    return out


def test_pickle_only_base_is_refused_unless_allowed(pickle_only_model: Path):
    quant, training = QuantizationConfig(), TrainingConfig(gradient_checkpointing=False)
    with pytest.raises(UnsafeModelError) as err:
        load_model(ModelConfig(name=str(pickle_only_model), dtype="float32"), quant, training)
    assert str(err.value) == (
        f"model.name: model '{pickle_only_model}' has only pickle weights (pytorch_model.bin), which can run code "
        "when loaded; convert them to safetensors, or set model.allow_pickle: true if you trust their source"
    )
    allowed = ModelConfig(name=str(pickle_only_model), dtype="float32", allow_pickle=True)
    assert load_model(allowed, quant, training).num_parameters() > 0


def test_safetensors_base_loads_and_remote_code_is_named(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture):
    quant, training = QuantizationConfig(), TrainingConfig(gradient_checkpointing=False)
    with caplog.at_level(logging.WARNING, logger="lora_tune"):
        load_model(ModelConfig(name=str(tiny_model_dir), dtype="float32"), quant, training)
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="lora_tune"):
        load_model(ModelConfig(name=str(tiny_model_dir), dtype="float32", trust_remote_code=True), quant, training)
    assert f"Python code from '{tiny_model_dir}' will run on this machine" in caplog.text


def test_redaction_of_known_and_token_shaped_values(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", "hf_short_but_set")
    assert redact("using hf_short_but_set now") == f"using {MASK} now"
    assert redact(f"Authorization: Bearer {TOKEN}") == f"Authorization: Bearer {MASK}"
    assert redact("hf_hub_download is a function name") == "hf_hub_download is a function name"
    logger = logging.getLogger("lora_tune.test_redaction")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    install_log_redaction(logger)
    logger.warning("token is %s", TOKEN)
    logger.removeHandler(handler)
    assert records == [f"token is {MASK}"]


def test_planted_token_never_reaches_the_run_directory_or_the_console(tmp_path: Path, tiny_model_dir: Path):
    """A whole run (and a failing one) with a token in the environment: grep every byte written and printed."""
    recipe = write_recipe(tmp_path, tiny_model_dir, "secret-run")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": TOKEN}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lora_tune.cli", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    trained = run("train", str(recipe), "training.max_steps=4")
    assert trained.returncode == 0, trained.stderr[-2000:]
    # A failure whose message echoes the offending value: here the token itself, pasted into the wrong place.
    refused = run("train", str(recipe), f"training.seed={TOKEN}")
    assert refused.returncode == 2 and "training.seed: expected a valid integer" in refused.stderr
    assert f"got '{MASK}'" in refused.stderr, "the value was echoed, redacted"
    written = [p for p in (tmp_path / "secret-run").rglob("*") if p.is_file()]
    assert any(p.name == "optimizer.pt" for p in written) and any(p.name == "environment.jsonl" for p in written)
    leaks = [str(p) for p in written if TOKEN.encode() in p.read_bytes()]
    for name, text in (("train stdout", trained.stdout), ("train stderr", trained.stderr)):
        if TOKEN in text:
            leaks.append(name)
    assert TOKEN not in refused.stderr + refused.stdout
    assert leaks == []


def test_pickle_only_adapter_is_refused(tmp_path: Path):
    from lora_tune.model.safety import check_weights_format

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UnsafeModelError, match=r"adapter '.*adapter' has only pickle weights \(adapter_model.bin\)"):
        check_weights_format(str(adapter), "adapter", allow_pickle=False, key=str(adapter.parent))
    check_weights_format(str(adapter), "adapter", allow_pickle=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    check_weights_format(str(adapter), "adapter", allow_pickle=False)
