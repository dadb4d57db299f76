"""What comes after online RL, proven by clients lora-tune did not write: a GRPO run on a tiny Llama with the real
Llama 3 vocabulary merges into a folder transformers loads, exports to a GGUF file whose logits llama.cpp computes as
transformers does (and whose chat template answers through llama.cpp), and its export folder is what `push` would
upload. The SFT path has the same proofs at length in tests/e2e/test_gguf.py; this file checks that an RL run's
adapter (trained by TRL's GRPOTrainer, not SFTTrainer) goes through the same exporter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.conftest import write_jsonl
from tests.helpers import RL_RECIPE as RECIPE
from tests.helpers import gguf_llama, max_logit_difference, require_llama_cpp, tiny_llama_with_real_vocab
from tests.helpers import rl_prompt_rows as prompt_rows

F16_LOGIT_TOLERANCE = 1e-2  # tests/e2e/test_gguf.py's bound for f16 (measured 2.5e-3 there)


@pytest.fixture(scope="module")
def rl_exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_llama_cpp()
    root = tmp_path_factory.mktemp("rl-gguf")
    base = tiny_llama_with_real_vocab(root / "base")
    data = write_jsonl(root / "prompts.jsonl", prompt_rows(16))
    recipe = root / "grpo.yaml"
    # A reward that differs between a group's completions (an untrained tiny model never answers a fruit and always
    # fills max_completion_length, so the recipe's answer and length rewards give every completion the same score,
    # zero advantages and no update): the completion's length in characters.
    (root / "rewards.py").write_text(
        "def chars(prompts, completions, **_):\n    return [float(len(str(c))) for c in completions]\n"
    )
    text = RECIPE.format(model=base, data=data, objective="grpo", out=root / "run")
    text = text.replace(
        "    - name: length\n      target: 3\n      weight: 0.5\n", f"    - function: {root}/rewards.py:chars\n"
    )
    recipe.write_text(text.replace("max_steps: 4", "max_steps: 2").replace("save_steps: 2", "save_strategy: 'no'"))
    assert main(["train", str(recipe)]) == 0
    assert main(["merge", str(root / "run"), "--output", str(root / "merged"), "--dtype", "fp32"]) == 0
    assert main(["export", str(root / "merged"), "--quant", "f16", "--output", str(root / "gguf")]) == 0
    return {"root": root, "run": root / "run", "merged": root / "merged", "out": root / "gguf"}


def test_an_rl_run_exports_to_gguf_that_llama_cpp_computes_as_transformers(rl_exported: dict[str, Path]):
    summary = json.loads((rl_exported["run"] / "summary.json").read_text())
    assert summary["objective"] == "grpo" and summary["steps"] == 2
    assert _logits(rl_exported["merged"]).sub(_logits(rl_exported["root"] / "base")).abs().max() > 1e-3  # RL moved it
    difference = max_logit_difference(rl_exported["merged"], rl_exported["out"] / "merged-F16.gguf")
    print(f"GRPO run, f16: max |logit difference| llama.cpp vs transformers {difference:.3g}")
    assert difference < F16_LOGIT_TOLERANCE
    llm = gguf_llama(rl_exported["out"] / "merged-F16.gguf")  # the chat template stored in the file renders the prompt
    try:
        reply = llm.create_chat_completion(
            [{"role": "user", "content": "fruit number 3?"}], temperature=0.0, top_k=1, max_tokens=8
        )["choices"][0]
    finally:
        llm.close()
    assert reply["finish_reason"] in ("stop", "length") and reply["message"]["content"] is not None


def _logits(folder: Path):  # noqa: ANN202 - a torch.Tensor
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)("fruit number 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits


def test_an_rl_export_folder_is_what_push_would_upload(rl_exported: dict[str, Path], capsys):
    capsys.readouterr()
    assert main(["push", str(rl_exported["out"]), "me/rl-model", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    for name in ("merged-F16.gguf", "Modelfile", "README.md"):
        assert name in listed, listed
    card = (rl_exported["out"] / "README.md").read_text()
    assert "merged-F16.gguf" in card
