"""A vision run's rows: every source read into canonical rows (lora_tune.data.vision), each image found, opened and
bounded before the model loads; validation from eval_datasets or a seeded val_size share (or data.split)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_tune.data.cleaning import hold_out
from lora_tune.data.sources import read_source
from lora_tune.data.vision import VisionRow, read_vision_rows
from lora_tune.errors import DataError
from lora_tune.recipe.schema import DatasetConfig, Recipe


@dataclass
class VisionSplits:
    train: list[VisionRow]
    validation: list[VisionRow]
    test: list[VisionRow]


def source_rows(recipe: Recipe, source: DatasetConfig) -> list[VisionRow]:
    """One source's canonical rows; images are relative to the data file's folder (or the save_to_disk folder)."""
    path = Path(source.path)
    base = path if path.is_dir() else path.parent
    v = recipe.vision
    assert v is not None
    rows = read_source(source).rows
    return read_vision_rows(rows, base, max_images=v.max_images, max_side=v.max_image_side)


def load_vision_splits(recipe: Recipe) -> VisionSplits:
    train = [row for s in recipe.datasets for row in source_rows(recipe, s)]
    validation = [row for s in recipe.eval_datasets for row in source_rows(recipe, s)]
    test = [row for s in recipe.test_datasets for row in source_rows(recipe, s)]
    seed = recipe.training.seed
    ratios = recipe.data.split_ratios
    if ratios is not None:
        if ratios[2] > 0:
            test, train = hold_out(train, ratios[2], seed)
        if ratios[1] > 0:
            validation, train = hold_out(train, ratios[1] / (ratios[0] + ratios[1]), seed + 1)
    elif recipe.val_size > 0 and not validation:
        validation, train = hold_out(train, recipe.val_size, seed)
    if not train:
        raise DataError("no training rows left after the held-out splits", file=recipe.datasets[0].path)
    return VisionSplits(train, validation, test)
