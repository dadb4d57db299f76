"""Rows with images read into one shape, and every bad image a one-line error naming file, row and image."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from lora_tune.data.sources import Origin
from lora_tune.data.vision import is_vision_row, open_image, read_vision_rows, vision_row
from lora_tune.errors import DataError
from tests.helpers import draw

WHERE = Origin("train.jsonl", 3, "line")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    draw("red", "circle").save(tmp_path / "img" / "a.png")
    draw("blue", "square").save(tmp_path / "img" / "b.png")
    return tmp_path


def _png() -> bytes:
    out = io.BytesIO()
    draw("green", "square").save(out, format="PNG")
    return out.getvalue()


def _parts(*images: str, text: str = "colour?") -> list[dict]:
    return [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}]


def test_openai_parts_with_paths_relative_to_the_data_file(folder: Path):
    row = {
        "messages": [
            {"role": "user", "content": _parts("img/a.png", "img/b.png")},
            {"role": "assistant", "content": "red"},
        ]
    }
    assert is_vision_row(row)
    got = vision_row(row, WHERE, folder, max_images=8)
    assert [c["path"] for c in got.images] == [str((folder / "img" / n).resolve()) for n in ("a.png", "b.png")]
    assert got.messages[0]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "colour?"}]
    assert got.messages[1]["content"] == [{"type": "text", "text": "red"}]


def test_llava_sharegpt_placeholders_with_an_images_column(folder: Path):
    row = {
        "conversations": [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red"}],
        "images": ["img/a.png"],
    }
    got = vision_row(row, WHERE, folder, max_images=8)
    assert got.messages[0] == {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}],
    }
    assert got.messages[1]["role"] == "assistant" and len(got.images) == 1


def test_embedded_bytes_and_data_urls_and_image_url_parts(folder: Path):
    png = _png()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image_url", "image_url": {"url": url}}]},
            {"role": "assistant", "content": "green"},
        ],
        "images": [{"bytes": png, "path": None}],
    }
    got = vision_row(row, WHERE, folder, max_images=8)
    assert [c["bytes"] for c in got.images] == [png, png]
    assert open_image(got.images[0]).size == (40, 40)
    again = vision_row(got.to_file_row(), WHERE, folder, max_images=8)  # the test split's JSON row reads back
    assert again.images == got.images and again.messages == got.messages


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {
                "conversations": [{"from": "human", "value": "<image> <image> hi"}, {"from": "gpt", "value": "x"}],
                "images": ["img/a.png"],
            },
            "has 2 image placeholder(s)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": _parts("img/missing.png")},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "image 0 (img/missing.png) not found",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": _parts("https://x/y.png")},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "is a URL; nothing is downloaded",
        ),
        (
            {"messages": [{"role": "user", "content": "no picture"}, {"role": "assistant", "content": "x"}]},
            "has no image",
        ),
        ({"messages": [{"role": "user", "content": _parts("img/a.png")}]}, "has no assistant turn"),
    ],
)
def test_bad_rows_are_one_line_naming_file_row_and_image(folder: Path, row: dict, expected: str):
    with pytest.raises(DataError) as err:
        vision_row(row, WHERE, folder, max_images=8)
    text = str(err.value)
    assert expected in text and "train.jsonl" in text and "line 3" in text and "\n" not in text


def test_unreadable_and_oversized_images_are_refused(folder: Path):
    (folder / "img" / "broken.png").write_bytes(b"not a picture")
    rows = [
        (
            WHERE,
            {
                "messages": [
                    {"role": "user", "content": _parts("img/broken.png")},
                    {"role": "assistant", "content": "x"},
                ]
            },
        )
    ]
    with pytest.raises(DataError, match=r"line 3.*image 0 \(.*broken.png\) cannot be read as an image"):
        read_vision_rows(rows, folder, max_images=8, max_side=4096)
    rows = [
        (
            WHERE,
            {"messages": [{"role": "user", "content": _parts("img/a.png")}, {"role": "assistant", "content": "x"}]},
        )
    ]
    with pytest.raises(DataError, match=r"image 0 \(.*a.png\) is 40x40, over vision.max_image_side \(32\)"):
        read_vision_rows(rows, folder, max_images=8, max_side=32)
    with pytest.raises(DataError, match=r"has 1 images, over vision.max_images"):
        vision_row(rows[0][1], WHERE, folder, max_images=0)


def test_an_image_in_an_answer_is_refused(folder: Path):
    row = {
        "messages": [
            {"role": "user", "content": _parts("img/a.png")},
            {"role": "assistant", "content": _parts("img/b.png")},
        ]
    }
    with pytest.raises(DataError, match="an image in an assistant turn"):
        vision_row(row, WHERE, folder, max_images=8)


def test_a_csv_cell_holding_a_json_list_of_images(folder: Path):
    row = {
        "conversations": json.loads(
            json.dumps([{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}])
        ),
        "images": '["img/a.png"]',
    }
    assert len(vision_row(row, WHERE, folder, max_images=8).images) == 1
