"""The `distributed:` section, the shipped accelerate / DeepSpeed configs, the refusals, and the translation to
Trainer fields. No process group here: see tests/e2e/test_distributed.py for the 2-process runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lora_tune.errors import RecipeError
from lora_tune.recipe.load import load_recipe
from lora_tune.recipe.strategy import (
    DEEPSPEED_AUTO_BATCH_KEYS,
    STRATEGIES,
    DistributedError,
    check_deepspeed_json,
    strategy_of_accelerate_config,
)
from lora_tune.training.distributed import Processes, deepspeed_config_path, launch_command
from lora_tune.training.processes import describe_batch

ROOT = Path(__file__).resolve().parents[3]
ACCELERATE = ROOT / "recipes" / "accelerate"
SHIPPED = {
    "ddp.yaml": "ddp",
    "fsdp-qlora.yaml": "fsdp",
    "deepspeed-zero2.yaml": "deepspeed-zero2",
    "deepspeed-zero3.yaml": "deepspeed-zero3",
}
BASE = """\
model: {name: some/model}
datasets: [{path: some/dataset}]
output_dir: runs/x
"""


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # accelerate resolves deepspeed_config_file relative to the working directory: the repository root.
    monkeypatch.chdir(ROOT)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)


def recipe_file(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(BASE + extra)
    return path


def test_every_shipped_accelerate_config_is_listed_and_parses():
    assert sorted(p.name for p in ACCELERATE.glob("*.yaml")) == sorted(SHIPPED)
    for name, strategy in SHIPPED.items():
        assert strategy_of_accelerate_config(ACCELERATE / name) == strategy, name


def test_fsdp_qlora_config_has_the_settings_that_make_qlora_shardable():
    fsdp = yaml.safe_load((ACCELERATE / "fsdp-qlora.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # decoder layers, from _no_split_modules
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True
    assert fsdp["fsdp_use_orig_params"] is False  # peft FSDP guide: needed for the memory savings
    assert fsdp["fsdp_version"] == 1


@pytest.mark.parametrize("strategy", ["deepspeed-zero2", "deepspeed-zero3"])
def test_shipped_deepspeed_json_is_valid_and_matches_its_accelerate_config(strategy: str):
    path = deepspeed_config_path(strategy)
    data = check_deepspeed_json(path, strategy)
    assert all(data[k] == "auto" for k in DEEPSPEED_AUTO_BATCH_KEYS)  # the recipe is the batch size's one source
    accel = yaml.safe_load((ACCELERATE / f"{strategy}.yaml").read_text())["deepspeed_config"]
    assert Path(accel["deepspeed_config_file"]).resolve() == path.resolve()
    assert accel["zero3_init_flag"] is (strategy == "deepspeed-zero3")


def test_deepspeed_json_with_a_fixed_batch_size_or_wrong_stage_is_refused(tmp_path: Path):
    data = json.loads(deepspeed_config_path("deepspeed-zero2").read_text())
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({**data, "train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(DistributedError, match='train_micro_batch_size_per_gpu must be "auto"'):
        check_deepspeed_json(bad, "deepspeed-zero2")
    with pytest.raises(DistributedError, match="stage is 2, but the strategy is deepspeed-zero3"):
        check_deepspeed_json(deepspeed_config_path("deepspeed-zero2"), "deepspeed-zero3")


def test_default_recipe_is_ddp_and_strategies_validate(tmp_path: Path):
    assert load_recipe(recipe_file(tmp_path, "")).distributed.strategy == "ddp"
    for strategy in STRATEGIES:
        extra = f"quantization: {{bits: 4}}\ndistributed: {{strategy: {strategy}}}\n"
        assert load_recipe(recipe_file(tmp_path, extra)).distributed.strategy == strategy


@pytest.mark.parametrize(
    ("extra", "key", "text"),
    [
        ("quantization: {bits: 8}\ndistributed: {strategy: fsdp}\n", "quantization.bits", "cannot be sharded"),
        ("quantization: {bits: 8}\ndistributed: {strategy: deepspeed-zero3}\n", "quantization.bits", "8-bit"),
        (
            "model: {name: m, dtype: bfloat16}\nquantization: {bits: 4, compute_dtype: float16}\n"
            "distributed: {strategy: fsdp}\n",
            "quantization.compute_dtype",
            "must equal model.dtype",
        ),
        (
            "quantization: {bits: 4}\ntraining: {optimizer: paged_adamw_8bit}\ndistributed: {strategy: fsdp}\n",
            "training.optimizer",
            "fails when a checkpoint is saved",
        ),
        (
            "distributed: {strategy: fsdp, accelerate_config: recipes/accelerate/ddp.yaml}\n",
            "distributed.accelerate_config",
            "either strategy or accelerate_config",
        ),
        ("distributed: {accelerate_config: nowhere.yaml}\n", "distributed.accelerate_config", "not found"),
        (
            "distributed: {deepspeed_config: lora_tune/training/ds_configs/zero2.json}\n",
            "distributed.deepspeed_config",
            "not DeepSpeed",
        ),
        (
            "quantization: {bits: 8}\ndistributed: {accelerate_config: recipes/accelerate/fsdp-qlora.yaml}\n",
            "quantization.bits",
            "cannot be sharded by fsdp",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_the_key(tmp_path: Path, extra: str, key: str, text: str):
    if extra.startswith("model:"):
        path = tmp_path / "r.yaml"
        path.write_text(extra + "datasets: [{path: some/dataset}]\noutput_dir: runs/x\n")
    else:
        path = recipe_file(tmp_path, extra)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.key == key and text in info.value.message, str(info.value)
    assert str(path) in str(info.value)


def test_ddp_with_8bit_and_zero2_with_8bit_are_allowed(tmp_path: Path):
    for strategy in ("ddp", "deepspeed-zero2"):
        load_recipe(recipe_file(tmp_path, f"quantization: {{bits: 8}}\ndistributed: {{strategy: {strategy}}}\n"))


def test_translation_to_trainer_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from lora_tune.training.trl_args import distributed_args

    single = distributed_args(load_recipe(recipe_file(tmp_path, "distributed: {strategy: fsdp}\n")))
    assert "fsdp" not in single and single["ddp_find_unused_parameters"] is False  # one process: no strategy
    assert "ddp_backend" not in single  # a backend would make accelerate start a process group for one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed_args(load_recipe(recipe_file(tmp_path, "")))["ddp_backend"] == "gloo"  # the CPU's group

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # FSDP / DeepSpeed are GPU-only
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())  # pretend deepspeed is installed
    fsdp = distributed_args(
        load_recipe(recipe_file(tmp_path, "quantization: {bits: 4}\ndistributed: {strategy: fsdp}\n"))
    )
    assert fsdp["fsdp"] is True and "ddp_backend" not in fsdp
    config = fsdp["fsdp_config"]
    assert config["version"] == 1 and config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config["cpu_ram_efficient_loading"] is True and config["use_orig_params"] is False
    plain = distributed_args(load_recipe(recipe_file(tmp_path, "distributed: {strategy: fsdp}\n")))
    assert plain["fsdp_config"]["version"] == 2  # unquantized LoRA: FSDP2
    zero3 = distributed_args(load_recipe(recipe_file(tmp_path, "distributed: {strategy: deepspeed-zero3}\n")))
    assert Path(zero3["deepspeed"]) == deepspeed_config_path("deepspeed-zero3") and Path(zero3["deepspeed"]).is_file()
    ddp = distributed_args(load_recipe(recipe_file(tmp_path, "")))
    assert set(ddp) == {"ddp_find_unused_parameters"}


def test_accelerate_launcher_settings_govern_and_must_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from lora_tune.training.distributed import resolve_strategy
    from lora_tune.training.trl_args import distributed_args

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    procs = Processes(rank=0, local_rank=0, world_size=2)
    assert resolve_strategy(load_recipe(recipe_file(tmp_path, "quantization: {bits: 4}\n")), procs) == "fsdp"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "fsdp" not in distributed_args(load_recipe(recipe_file(tmp_path, "")))  # accelerate's env config rules
    clash = load_recipe(recipe_file(tmp_path, "distributed: {strategy: deepspeed-zero2}\n"))
    with pytest.raises(RecipeError, match="asks for deepspeed-zero2 but the launcher's accelerate config is fsdp"):
        resolve_strategy(clash, procs)
    eight_bit = load_recipe(recipe_file(tmp_path, "quantization: {bits: 8}\n"))
    with pytest.raises(RecipeError, match="cannot be sharded by fsdp"):
        resolve_strategy(eight_bit, procs)


def test_sharded_strategies_need_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from lora_tune.training.distributed import resolve_strategy

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    recipe = load_recipe(recipe_file(tmp_path, "distributed: {strategy: fsdp}\n"))
    with pytest.raises(RecipeError, match="fsdp needs CUDA GPUs"):
        resolve_strategy(recipe, Processes(0, 0, 2))
    assert resolve_strategy(recipe, Processes()) == "ddp"  # a single process ignores the strategy


def test_bnb_config_stores_4bit_weights_in_the_compute_dtype_when_sharded():
    import torch

    from lora_tune.model.load import build_bnb_config
    from lora_tune.recipe.schema import QuantizationConfig

    quant = QuantizationConfig(bits=4)
    sharded = build_bnb_config(quant, torch.bfloat16, sharded=True)
    assert sharded.bnb_4bit_quant_storage == torch.bfloat16 == sharded.bnb_4bit_compute_dtype
    assert build_bnb_config(quant, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default


def test_launch_command(tmp_path: Path):
    recipe = load_recipe(recipe_file(tmp_path, ""))
    torchrun = launch_command(recipe, 4, ["r.yaml", "training.max_steps=3"])
    assert torchrun[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    assert torchrun[-5:] == ["-m", "lora_tune", "train", "r.yaml", "training.max_steps=3"]
    accel = load_recipe(recipe_file(tmp_path, "distributed: {accelerate_config: recipes/accelerate/ddp.yaml}\n"))
    command = launch_command(accel, 2, ["r.yaml"])
    assert command[1:5] == ["-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/ddp.yaml"]
    assert command[command.index("--num_processes") + 1] == "2"


def test_effective_batch_and_rank_prefix():
    assert describe_batch(2, 4, 8).endswith("= 64 examples per optimizer step")
    assert describe_batch(2, 4, 8, packed=True).endswith("= 64 packed rows (several examples each) per optimizer step")
    assert Processes(1, 1, 4).prefix() == "[rank 1/4] " and Processes().prefix() == ""


def test_nproc_below_one_is_a_user_error(capsys: pytest.CaptureFixture[str]):
    from lora_tune.cli import main

    assert main(["train", "recipes/quickstart.yaml", "--nproc", "0"]) == 2
    assert "--nproc: expected a number of processes >= 1, got 0" in capsys.readouterr().err
