"""A recipe with `vision:` is the vision task; what a vision run cannot honour is refused, naming the key."""

from __future__ import annotations

import pytest
import yaml

from lora_tune.errors import LoraTuneError
from lora_tune.recipe.schema import Recipe

BASE = {"model": {"name": "m"}, "datasets": [{"path": "d.jsonl"}], "output_dir": "runs/x", "vision": {}}


def test_a_vision_section_makes_a_vision_run_that_never_packs_and_reads_back():
    recipe = Recipe.model_validate(BASE)
    assert recipe.task_name == "vision" and recipe.vision.train_projector is False
    resolved = recipe.model_dump()
    assert resolved["training"]["packing"] is False and resolved["vision"]["max_image_side"] == 4096
    assert Recipe.model_validate(yaml.safe_load(yaml.safe_dump(resolved))).task_name == "vision"
    assert "vision" not in Recipe.model_validate({k: v for k, v in BASE.items() if k != "vision"}).model_dump()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"training": {"packing": True}}, "images are not packed"),
        ({"training": {"objective": "dpo"}}, r"a vision run \(vision:\) is supervised fine-tuning \(sft\) only"),
        ({"training": {"train_on": "all"}}, "must be assistant in a vision run"),
        ({"adapter": {"method": "ia3"}}, "a vision run trains lora"),
        ({"vision": {"train_projector": "yes please"}}, "train_projector"),
        ({"data": {"on_bad_rows": "skip"}}, "not applied to image rows"),
        ({"datasets": [{"path": "d.jsonl", "weight": 2.0}]}, "is not applied to image rows yet"),
    ],
)
def test_what_a_vision_run_cannot_do_is_refused(change: dict, expected: str):
    with pytest.raises((LoraTuneError, ValueError), match=expected):
        Recipe.model_validate({**BASE, **change})
