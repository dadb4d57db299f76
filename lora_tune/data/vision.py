"""Conversations with images: rows read into one canonical shape, each image found, opened and bounded.

Two spellings are read, from any source `sources.py` reads (JSON Lines, JSON, CSV, Parquet, `save_to_disk`):
- messages whose content is a list of OpenAI-style parts: `{"type": "text", "text": ...}` and
  `{"type": "image", "image": PATH}` (or `"path"`, `"url"`), `{"type": "image_url", "image_url": {"url": ...}}`, or a
  bare `{"type": "image"}` filled, in order, from the row's `images` column;
- LLaVA / ShareGPT rows: `<image>` placeholders in the text of `messages` or `conversations` ({from, value}), with an
  `images` list (or one `image`) holding as many images as there are placeholders.

An image is a path (relative to the data file's folder), a `data:image/...;base64,` URL, or embedded bytes (a
`{"bytes": ..., "path": ...}` cell, as datasets' Image feature writes to Parquet and `save_to_disk`). Remote URLs are
refused: nothing is downloaded. Every error is one line naming the file, the row and the image.

The canonical row: `messages` (each content a list of parts, images as bare `{"type": "image"}`) and `images` (one
`{"path", "bytes"}` cell per image part, in order), so `datasets` stores it and the collator opens the images.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tune.data.masking import IGNORE_INDEX, label_image_tokens, render_image_conversation
from lora_tune.data.sources import Origin

PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_IMAGE_TYPES = ("image", "image_url")


@dataclass(frozen=True)
class VisionRow:
    """One conversation with its images: `messages` in parts, `images` as {"path", "bytes"} cells, in order."""

    messages: list[dict[str, Any]]
    images: list[dict[str, Any]]
    origin: Origin

    def to_json(self) -> dict[str, Any]:
        """The row as `datasets` stores it (messages as JSON text: parts differ in shape between turns)."""
        return {"messages": json.dumps(self.messages, ensure_ascii=False), "images": self.images}

    def to_file_row(self) -> dict[str, Any]:
        """The row as a JSON line that this module reads back: each image inline, its path or a data URL."""
        images = iter(self.images)
        messages = []
        for message in self.messages:
            parts = []
            for part in message["content"]:
                parts.append({"type": "image", "image": _as_text(next(images))} if part["type"] == "image" else part)
            messages.append({"role": message["role"], "content": parts})
        return {"messages": messages}


def is_vision_row(row: Mapping[str, Any]) -> bool:
    """Whether a row carries images (an images/image column, or image parts in its messages)."""
    if row.get("images") is not None or row.get("image") is not None:
        return True
    turns = row.get("messages") or []
    return isinstance(turns, list) and any(
        isinstance(t, Mapping) and isinstance(t.get("content"), list) and any(_is_image(p) for p in t["content"])
        for t in turns
    )


def vision_row(row: Mapping[str, Any], origin: Origin, base: Path, *, max_images: int) -> VisionRow:
    """The canonical row of `row` (read from a file in folder `base`), images resolved but not opened."""
    turns, column = (
        (row.get("messages"), "messages") if "messages" in row else (row.get("conversations"), "conversations")
    )
    if not isinstance(turns, list) or not turns:
        raise origin.error("needs a non-empty messages (or conversations) list", "messages")
    pool = _column_images(row, origin)
    explicit: list[Any] = []
    messages: list[dict[str, Any]] = []
    slots = 0  # image parts waiting for an image from the images column
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise origin.error(f"turn {i} is not an object", column)
        role = ROLES.get(str(turn.get("role", turn.get("from", ""))))
        if role is None:
            raise origin.error(
                f"turn {i} has role {turn.get('role', turn.get('from'))!r}; expected user/assistant/system", column
            )
        content = turn.get("content", turn.get("value"))
        parts: list[dict[str, Any]] = []
        for part in _parts(content, origin, column, i):
            if part["type"] != "image":
                parts.append(part)
                continue
            source = part.get("source")
            if source is None:
                slots += 1
                explicit.append(None)
            else:
                explicit.append(source)
            parts.append({"type": "image"})
        if role == "assistant" and any(p["type"] == "image" for p in parts):
            raise origin.error(f"turn {i}: an image in an assistant turn; images go in user turns", column)
        messages.append({"role": role, "content": parts})
    if slots != len(pool):
        raise origin.error(
            f"has {slots} image placeholder(s) ({PLACEHOLDER} or bare image parts) but {len(pool)} image(s) in its "
            "images column; give one image per placeholder",
            "images",
        )
    if len(explicit) > max_images:
        raise origin.error(f"has {len(explicit)} images, over vision.max_images ({max_images})", "images")
    if not explicit:
        raise origin.error("has no image; a vision run's rows each hold at least one", "images")
    filled = iter(pool)
    images = [
        image_cell(source if source is not None else next(filled), origin, base, k)
        for k, source in enumerate(explicit)
    ]
    if not any(m["role"] == "assistant" for m in messages):
        raise origin.error("has no assistant turn to train on", column)
    return VisionRow(messages, images, origin)


def open_image(cell: Mapping[str, Any], origin: Origin | None = None, index: int = 0, *, max_side: int | None = None):  # noqa: ANN201 - a PIL image
    """The image of a {"path", "bytes"} cell, as RGB; a missing, unreadable or oversized image is a DataError."""
    from PIL import Image, UnidentifiedImageError

    name = cell.get("path") or "embedded bytes"
    where = origin or Origin(str(name), 0)
    try:
        data = cell.get("bytes")
        with Image.open(io.BytesIO(data) if data is not None else cell["path"]) as image:
            size = image.size
            if max_side is not None and max(size) > max_side:
                raise where.error(
                    f"image {index} ({name}) is {size[0]}x{size[1]}, over vision.max_image_side ({max_side}); "
                    "resize it or raise the bound",
                    "images",
                )
            return image.convert("RGB")
    except FileNotFoundError:
        raise where.error(f"image {index} ({name}) not found", "images") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise where.error(f"image {index} ({name}) cannot be read as an image: {e}", "images") from None


def read_vision_rows(
    rows: Sequence[tuple[Origin, Mapping[str, Any]]], base: Path, *, max_images: int, max_side: int
) -> list[VisionRow]:
    """Every row canonical and each of its images opened once (found, readable, within the bound)."""
    out = []
    for origin, row in rows:
        canonical = vision_row(row, origin, base, max_images=max_images)
        for k, cell in enumerate(canonical.images):
            open_image(cell, origin, k, max_side=max_side)
        out.append(canonical)
    return out


def _is_image(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") in _IMAGE_TYPES


def _parts(content: Any, origin: Origin, column: str, turn: int) -> list[dict[str, Any]]:
    """A turn's content as parts: text split at <image> placeholders; image parts with their source (or none)."""
    if content is None:
        return []
    if isinstance(content, str):
        pieces = content.split(PLACEHOLDER)
        parts: list[dict[str, Any]] = []
        for k, piece in enumerate(pieces):
            if k:
                parts.append({"type": "image"})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip("\n") if k or len(pieces) > 1 else piece})
        return parts
    if not isinstance(content, list):
        raise origin.error(
            f"turn {turn}: content is {type(content).__name__}; expected text or a list of parts", column
        )
    parts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") not in ("text", *_IMAGE_TYPES):
            raise origin.error(
                f"turn {turn}: a content part must be {{type: text|image|image_url}}, got {part!r:.60}", column
            )
        if part["type"] == "text":
            parts.extend(_parts(str(part.get("text") or ""), origin, column, turn))
            continue
        source = part.get("image") or part.get("path") or part.get("url") or part.get("image_url")
        if isinstance(source, Mapping) and "url" in source:
            source = source["url"]
        parts.append({"type": "image", "source": source})
    return parts


def _column_images(row: Mapping[str, Any], origin: Origin) -> list[Any]:
    images = row.get("images")
    if images is None and row.get("image") is not None:
        images = [row["image"]]
    if images is None:
        return []
    if isinstance(images, str):  # a CSV cell: a JSON list or one path
        images = json.loads(images) if images.startswith("[") else [images]
    if not isinstance(images, list):
        raise origin.error(f"images is {type(images).__name__}; expected a list of paths or images", "images")
    return list(images)


def image_cell(source: Any, origin: Origin, base: Path, index: int) -> dict[str, Any]:
    """A {"path", "bytes"} cell of an image source: a path (relative to `base`), a data URL, bytes or a cell."""
    if isinstance(source, (bytes, bytearray)):
        return {"path": None, "bytes": bytes(source)}
    if isinstance(source, Mapping):
        if source.get("bytes") is not None:
            return {"path": source.get("path"), "bytes": bytes(source["bytes"])}
        source = source.get("path")
    if not isinstance(source, str) or not source:
        raise origin.error(f"image {index} is {source!r:.40}; expected a path, a data URL or bytes", "images")
    if source.startswith("data:"):
        try:
            return {"path": None, "bytes": base64.b64decode(source.split(",", 1)[1], validate=True)}
        except (IndexError, ValueError):
            raise origin.error(f"image {index} is a data URL that is not base64", "images") from None
    if source.startswith(("http://", "https://")):
        raise origin.error(
            f"image {index} ({source:.60}) is a URL; nothing is downloaded: save it and give its path", "images"
        )
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise origin.error(f"image {index} ({source}) not found (looked for {path})", "images")
    return {"path": str(path.resolve()), "bytes": None}


def _as_text(cell: Mapping[str, Any]) -> str:
    if cell.get("bytes") is not None:
        return "data:image/png;base64," + base64.b64encode(cell["bytes"]).decode("ascii")
    return str(cell["path"])


@dataclass
class VisionBatch:
    """What the collator made of a few rows: the model's inputs; per row, its image tokens and whether it was cut."""

    inputs: dict[str, Any]
    image_tokens: list[int]
    truncated: list[bool]


class VisionCollator:
    """Batches of canonical rows for the trainer: the processor renders the conversation and turns each image into
    pixels and image tokens; lora_tune.data.masking labels the assistant turns (never an image token). Images are
    opened here, batch by batch, as TRL's own vision collator does: pixels for a whole dataset would not fit."""

    def __init__(self, processor: Any, max_length: int | None, max_side: int | None = None):
        self.processor, self.max_length, self.max_side = processor, max_length, max_side

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self.collate(rows).inputs

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> VisionBatch:
        import torch

        tokenizer = self.processor.tokenizer
        rendered = [render_image_conversation(_messages(row), tokenizer) for row in rows]
        images = [
            [open_image(cell, None, k, max_side=self.max_side) for k, cell in enumerate(row["images"])] for row in rows
        ]
        out = self.processor(
            text=[text for text, _, _ in rendered],
            images=images,
            padding=True,
            padding_side="right",
            add_special_tokens=False,
            return_tensors="pt",
        )
        ids, mask = out["input_ids"], out["attention_mask"]
        image_token = getattr(self.processor, "image_token", PLACEHOLDER)
        placeholders = frozenset({tokenizer.convert_tokens_to_ids(image_token)})
        examples = [
            label_image_tokens(plain, trained, ids[i][mask[i] == 1].tolist(), self.max_length, placeholders)
            for i, (_, plain, trained) in enumerate(rendered)
        ]
        length = max(len(e.input_ids) for e in examples)
        for key, value in list(out.items()):  # every per-token tensor (ids, mask, token types) cut alike
            if hasattr(value, "shape") and tuple(value.shape[:2]) == tuple(ids.shape):
                out[key] = value[:, :length]
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        for i, example in enumerate(examples):
            labels[i, : len(example.labels)] = torch.tensor(example.labels, dtype=torch.long)
        out["labels"] = labels
        return VisionBatch(dict(out), [e.image_tokens for e in examples], [e.truncated for e in examples])


def _messages(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = row["messages"]
    return json.loads(messages) if isinstance(messages, str) else list(messages)
