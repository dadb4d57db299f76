"""`serve --engine vllm`: the adapter checks that decide whether vLLM can load a run, and the command printed."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.serve.backend import ServeError
from lora_tune.serve.vllm import check_adapter

GOOD = {"peft_type": "LORA", "r": 12, "lora_alpha": 24, "target_modules": ["q_proj", "v_proj"], "bias": "none"}


def test_the_rank_vllm_is_started_with_holds_the_adapters() -> None:
    assert check_adapter(GOOD) == 16
    assert check_adapter({**GOOD, "r": 8}) == 8
    assert check_adapter({**GOOD, "r": 300}) == 320


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "biases"),
        ({"peft_type": "IA3"}, "LoRA adapters only"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
        ({"target_modules": ".*proj"}, "pattern"),
        ({"rank_pattern": {"q_proj": 4}}, "per-layer ranks"),
        ({"r": 1024}, "rank 1024"),
    ],
)
def test_an_adapter_vllm_cannot_load_is_refused_naming_why(change: dict, reason: str) -> None:
    with pytest.raises(ServeError, match=reason):
        check_adapter({**GOOD, **change})


def test_the_command_serves_the_adapter_on_its_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "myrun"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(GOOD))
    (run / "recipe.yaml").write_text(
        f"model:\n  name: org/base-1b\nquantization:\n  bits: 4\ndatasets:\n  - path: data.jsonl\noutput_dir: {run}\n"
    )
    assert main(["serve", str(run), "--engine", "vllm", "--port", "9000"]) == 0
    words = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert words[:3] == ["vllm", "serve", "org/base-1b"]
    assert "--enable-lora" in words and words[words.index("--max-lora-rank") + 1] == "16"
    assert words[words.index("--lora-modules") + 1] == f"myrun={(run / 'adapter').resolve()}"
    assert words[words.index("--quantization") + 1] == "bitsandbytes" and words[words.index("--port") + 1] == "9000"
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({**GOOD, "use_dora": True}))
    assert main(["serve", str(run), "--engine", "vllm"]) == 2
    assert "DoRA" in capsys.readouterr().err
