"""`plan` on a vision-language base: the tower and projector counted in the model dtype, the image tokens named."""

from __future__ import annotations

from pathlib import Path

from lora_tune.plan.memory import plan
from lora_tune.plan.vision import vision_shape
from lora_tune.recipe.load import load_recipe
from tests.helpers import build_tiny_vlm, write_vision_recipe


def test_the_plan_counts_the_vision_tower_and_the_image_tokens(tmp_path: Path):
    base = build_tiny_vlm(tmp_path / "base", "llava")
    (tmp_path / "d.jsonl").write_text("")
    result = plan(load_recipe(write_vision_recipe(tmp_path, base, tmp_path / "d.jsonl"), check_paths=False))
    assert result.parts["vision tower + projector"] > 0
    assert any("4 image tokens per picture (28x28, patch 14)" in note for note in result.notes)


def test_image_tokens_per_family():
    llava = {"model_type": "llava", "vision_config": {"hidden_size": 1024, "image_size": 336, "patch_size": 14}}
    assert vision_shape(llava).image_tokens == 576  # LLaVA-1.5: 24 x 24 patches
    smolvlm = {"model_type": "idefics3", "scale_factor": 4, "vision_config": {"image_size": 512, "patch_size": 16}}
    assert vision_shape(smolvlm).image_tokens == 64  # SmolVLM: 32 x 32 patches / 4^2 per tile
    assert vision_shape({"model_type": "qwen2_5_vl", "vision_config": {"hidden_size": 1280}}).image_tokens is None
    assert vision_shape({"model_type": "llama"}) is None
