"""Masking with images: the processor's ids labelled from the rendered text's, assistant answers trained, image tokens
never, an image cut by max_length refused; and the collator on a tiny LLaVA and Idefics3 processor."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.data.masking import IGNORE_INDEX, TemplateError, label_image_tokens
from lora_tune.data.sources import Origin
from lora_tune.data.vision import VisionCollator, vision_row
from tests.helpers import build_tiny_vlm, colour_rows

IMG = 9  # an image placeholder id the "processor" expands to three


def test_inserted_image_tokens_are_never_trained_and_answers_are():
    plain = [1, 5, IMG, 6, 7, 8, 2]
    trained = [False, False, False, False, True, True, False]
    expanded = [1, 5, IMG, IMG, IMG, 6, 7, 8, 2]
    got = label_image_tokens(plain, trained, expanded, None, frozenset({IMG}))
    assert got.labels == [IGNORE_INDEX] * 6 + [7, 8, IGNORE_INDEX] and got.image_tokens == 3


def test_an_image_cut_by_max_length_is_refused_and_text_after_it_is_cut():
    plain, trained = [1, IMG, 6, 7, 8], [False, False, False, True, True]
    expanded = [1, IMG, IMG, IMG, 6, 7, 8]
    with pytest.raises(TemplateError, match="an image is cut by max_length 3"):
        label_image_tokens(plain, trained, expanded, 3)
    got = label_image_tokens(plain, trained, expanded, 6)
    assert got.truncated and got.input_ids == expanded[:6] and got.labels[-1] == 7


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def family(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    from tests.conftest import write_jsonl

    data = write_jsonl(root / "data.jsonl", colour_rows(root, 3, seed=5))
    return request.param, build_tiny_vlm(root / "base", request.param), data


def test_the_collator_trains_the_answer_and_its_end_of_turn_only(family):
    import json

    from transformers import AutoProcessor

    name, base, data = family
    processor = AutoProcessor.from_pretrained(base)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    canonical = [
        vision_row(r, Origin(str(data), k + 1), data.parent, max_images=8).to_json() for k, r in enumerate(rows)
    ]
    batch = VisionCollator(processor, 64).collate(canonical)
    tokenizer = processor.tokenizer
    for i, row in enumerate(rows):
        labels = [t for t in batch.inputs["labels"][i].tolist() if t != IGNORE_INDEX]
        assert tokenizer.decode(labels) == row["messages"][1]["content"] + "<|end|>"
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids, labels = batch.inputs["input_ids"], batch.inputs["labels"]
    assert int((ids == image_id).sum()) == sum(batch.image_tokens) - (
        0 if name == "llava" else 3 * 3
    )  # Idefics3: 3 markers
    assert not bool(((ids == image_id) & (labels != IGNORE_INDEX)).any())
    assert "pixel_values" in batch.inputs
    with pytest.raises(TemplateError, match="an image is cut by max_length 4"):
        VisionCollator(processor, 4).collate(canonical[:1])
