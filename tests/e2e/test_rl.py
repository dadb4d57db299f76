"""Online RL end to end on the tiny 4-bit model on the CPU: grpo and rloo train from prompt rows with a reference
answer, write the sampled completions with their rewards and the reward curve, evaluate base vs tuned with the run's
own rewards, and merge to a folder transformers loads; the recipe `new --objective grpo` writes validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.conftest import write_jsonl
from tests.helpers import RL_RECIPE as RECIPE
from tests.helpers import rl_prompt_rows as prompt_rows


def write_recipe(root: Path, model: Path, objective: str, name: str) -> Path:
    data = write_jsonl(root / "prompts.jsonl", prompt_rows(24))
    path = root / f"{name}.yaml"
    path.write_text(RECIPE.format(model=model, data=data, objective=objective, out=root / name))
    return path


@pytest.fixture(scope="module", params=["grpo", "rloo"])
def rl_run(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run of each online objective, shared by the tests below."""
    root = tmp_path_factory.mktemp(request.param)
    assert main(["train", str(write_recipe(root, tiny_model_dir, request.param, "run"))]) == 0
    return root / "run"


def test_an_rl_run_trains_logs_its_completions_and_evaluates(rl_run: Path, tmp_path: Path):
    run, objective = rl_run, rl_run.parent.name.rstrip("0123456789")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["objective"] == objective and summary["quantized_layers"] > 0
    assert summary["train_reward"] is not None and summary["eval_reward"] is not None
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*records)
    assert {"reward", "rewards/answer/mean", "rewards/length/std", "completions/mean_length"} <= logged
    assert "eval_reward" in logged
    completions = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert {c["split"] for c in completions} == {"train", "eval"}
    first = completions[0]
    assert set(first["rewards"]) == {"answer", "length"} and first["prompt"].startswith("fruit number")
    assert first["total"] == pytest.approx(first["rewards"]["answer"] + 0.5 * first["rewards"]["length"])
    assert (run / "reward.png").stat().st_size > 0

    held_out = write_jsonl(tmp_path / "held_out.jsonl", prompt_rows(8, start=100))
    assert main(["eval", str(run), "--data", str(held_out)]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["task"] == "rl" and report["rows"] == 8
    for score in (report["tuned"], report["base"]):
        assert set(score["rl"]["rewards"]) == {"answer", "length"} and 0 <= score["rl"]["pass_rate"] <= 1
    assert "| prompt | reference | base | fine-tuned |" in (run / "eval.md").read_text()


def test_an_rl_run_merges_into_a_folder_transformers_loads(rl_run: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    assert main(["merge", str(rl_run), "--output", str(tmp_path / "merged")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.config.num_hidden_layers == 2


def test_an_rl_recipe_is_refused_where_the_batch_cannot_hold_whole_groups(
    tiny_model_dir: Path, tmp_path: Path, capsys
):
    recipe = write_recipe(tmp_path, tiny_model_dir, "grpo", "run")
    assert main(["train", str(recipe), "rl.num_generations=3"]) == 2
    err = capsys.readouterr().err
    assert "training.batch_size: 4 completions x 1 steps per generation is not a multiple" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("form", ["prompts", "alpaca"])
def test_new_writes_an_rl_recipe_that_validates(form: str, tiny_model_dir: Path, tmp_path: Path, capsys):
    from tests.conftest import fruit_rows

    rows = prompt_rows(40) if form == "prompts" else fruit_rows(40, "alpaca")
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    args = ["new", "--model", str(tiny_model_dir), "--method", "qlora", "--data", str(data), "--objective", "grpo"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "objective: grpo" in text and "rl:" in text and "- name: answer" in text
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(text)
    assert main(["validate", str(recipe)]) == 0


def test_the_best_checkpoint_is_picked_by_the_held_out_reward(tiny_model_dir: Path, tmp_path: Path):
    recipe = write_recipe(tmp_path, tiny_model_dir, "grpo", "run")
    assert main(["train", str(recipe), "training.keep_best=true", "training.best_metric=reward"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    during = {}  # each evaluation during training (the final one, of the best checkpoint, is logged again)
    for record in records:
        if "eval_reward" in record:
            during.setdefault(record["step"], record["eval_reward"])
    best = max(sorted(during), key=during.__getitem__)  # the first of equals, as transformers keeps it
    assert summary["best"]["metric"] == "eval_reward" and summary["best"]["step"] == best


def test_an_rl_run_killed_then_resumed_ends_as_the_unbroken_run(rl_run: Path, tiny_model_dir: Path, tmp_path: Path):
    """grpo and rloo (the task matrix runs grpo through every guarantee; this is rloo's resume too), on the 4-bit
    base: kill -9 after step 3, --resume from checkpoint-2, the same adapter and the same sampled completions."""
    import signal

    from safetensors.torch import load_file

    from tests.helpers import run_cli

    objective = rl_run.parent.name.rstrip("0123456789")
    recipe = write_recipe(tmp_path, tiny_model_dir, objective, "killed")
    killed = run_cli("train", str(recipe), fault=("kill-at-step", 3))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert main(["train", str(recipe), "--resume"]) == 0
    reference = load_file(rl_run / "adapter" / "adapter_model.safetensors")
    continued = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert reference.keys() == continued.keys()
    assert all(bool((reference[k] == continued[k]).all()) for k in reference), "bit-identical to the unbroken run"
    assert (tmp_path / "killed" / "completions.jsonl").read_text() == (rl_run / "completions.jsonl").read_text()
