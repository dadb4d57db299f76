"""A model's safetensors weights: where the base is (its folder, or a hub snapshot), how its tensors lie in shards,
and reading and writing them one tensor at a time, with plain file reads and writes (no mmap).

`safetensors.safe_open` maps the whole shard, and every page it touches counts in the process's resident memory
until the file is closed; `safetensors.torch.save_file` copies every tensor to bytes before writing. Both make a
merge's peak about three shards. Here a reader fills one tensor from the file, and a writer writes the header
first (shapes and dtypes are known from the source header) and then each tensor as it is produced, so the merge
holds about one tensor at a time. The format is the documented one: an 8-byte little-endian header length, a
JSON header (name -> dtype, shape, data_offsets; `__metadata__`), padded with spaces to 8 bytes, then the data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.errors import LoraTuneError

if TYPE_CHECKING:
    import torch

    from lora_tune.recipe.schema import ModelConfig

_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class WeightsError(LoraTuneError):
    """A base model's safetensors weights cannot be found or read as asked (exit 2)."""


def torch_dtype(code: str) -> torch.dtype:
    import torch

    if code not in _NAMES:
        raise WeightsError(f"safetensors dtype {code} is not supported by the streaming merge")
    return getattr(torch, _NAMES[code])


def dtype_code(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for code, candidate in _NAMES.items():
        if candidate == name:
            return code
    raise WeightsError(f"cannot write {dtype} to safetensors")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path` (config.json, adapter_config.json, an index): a missing, unreadable, empty or
    broken file is one line that names it (WeightsError, exit 2), not a JSONDecodeError without a file name."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    if not text.strip():
        raise WeightsError(f"{path}: the file is empty; expected a JSON object (copy it again, or save it again)")
    try:
        data = json.loads(text)
    except ValueError as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise WeightsError(f"{path}: not valid JSON{where} (a truncated or hand-edited file?)") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header's size


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The tensor entries of a safetensors file's header and where its data starts, checked against the file's
    size, so that an empty, truncated or foreign file is one line naming it (WeightsError, exit 2) before any
    tensor is read, rather than the safetensors library's "header too small" without a file name."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw_length = handle.read(8)
            length = struct.unpack("<Q", raw_length)[0] if len(raw_length) == 8 else None
            raw = handle.read(length) if length is not None and length <= min(MAX_HEADER, size - 8) else b""
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if size == 0:
        raise WeightsError(f"{path}: the file is empty; expected safetensors weights (copy it again, or train again)")
    if length is None or not raw:
        raise WeightsError(f"{path}: not a safetensors file, or cut short ({size:,} bytes; no complete header)")
    header = _parse_header(path, raw)
    data = size - 8 - length
    needed = max((_end(path, name, info) for name, info in header.items()), default=0)
    if data != needed:
        shortfall = "truncated" if data < needed else "longer than its header says"
        raise WeightsError(
            f"{path}: {shortfall}: its header describes {needed:,} bytes of tensors, the file holds {data:,} "
            "(copy it again, or train again)"
        )
    return header, 8 + length


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return header


def _end(path: Path, name: str, info: Any) -> int:
    """Where a tensor's bytes end in the data section, from its header entry."""
    try:
        start, end = info["data_offsets"]
        if not 0 <= int(start) <= int(end):
            raise ValueError
        return int(end)
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: not a safetensors file (tensor '{name}' has no valid data_offsets)") from None


def check_model_folder(folder: Path) -> None:
    """config.json and every safetensors file of a model folder (a merged model, a run's model/) are whole: one
    line naming the first broken file, exit 2, before any weights are loaded. Only headers are read."""
    read_json(folder / "config.json")
    index = folder / INDEX_FILE
    shards = set(read_json(index).get("weight_map", {}).values()) if index.is_file() else set()
    shards |= {path.name for path in folder.glob("*.safetensors")}
    for shard in sorted(shards):
        safetensors_header(folder / shard)


def check_adapter_folder(folder: Path) -> dict[str, Any]:
    """adapter_config.json, returned, and adapter_model.safetensors (when there is one) of a peft adapter are
    whole: one line naming the first broken file, exit 2, before any weights are loaded."""
    config = read_json(folder / "adapter_config.json")
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        safetensors_header(weights)
    return config


class ShardReader:
    """Header of a safetensors file, and its tensors read one by one."""

    def __init__(self, path: Path):
        self.path = path
        self.header, self.data_start = safetensors_header(path)

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> list[int]:
        return self.header[name]["shape"]

    def dtype(self, name: str) -> torch.dtype:
        return torch_dtype(self.header[name]["dtype"])

    def read(self, name: str) -> torch.Tensor:
        import torch

        info = self.header[name]
        start, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=torch_dtype(info["dtype"]))
        buffer = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else None
        if buffer is not None:
            with open(self.path, "rb") as handle:
                handle.seek(self.data_start + start)
                if handle.readinto(memoryview(buffer)) != end - start:
                    raise WeightsError(f"{self.path}: tensor '{name}' is truncated")
        return tensor


def write_safetensors(
    path: Path, specs: dict[str, tuple[torch.dtype, list[int]]], tensors: Iterable[tuple[str, torch.Tensor]]
) -> int:
    """Write the header from `specs` (name -> dtype, shape), then each tensor as `tensors` yields it; returns bytes.

    The tensors must come in the order of `specs` and match it exactly.
    """
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in specs.items():
        size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    expected = iter(specs.items())
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, tensor in tensors:
            want_name, (want_dtype, want_shape) = next(expected)
            if name != want_name or tensor.dtype != want_dtype or list(tensor.shape) != list(want_shape):
                raise WeightsError(
                    f"internal: tensor '{name}' {tensor.dtype} {list(tensor.shape)} does not match the header "
                    f"('{want_name}' {want_dtype} {list(want_shape)})"
                )
            if tensor.numel():
                handle.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
    if next(expected, None) is not None:
        raise WeightsError(f"internal: {path.name} ended before all its tensors were written")
    return offset


HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "README.md"]  # README: the license


def resolve_base(model: ModelConfig) -> Path:
    """The base's local folder: the recipe's path, or a hub snapshot of the files a merge needs."""
    local = Path(model.name).expanduser()
    if local.is_dir():
        return local
    if model.name.startswith((".", "/", "~")):
        raise WeightsError(f"model.name: base model folder '{model.name}' not found")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=model.name, revision=model.revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"model.name: cannot fetch the base model '{model.name}': {first}") from exc


SINGLE_FILE = "model.safetensors"


INDEX_FILE = "model.safetensors.index.json"


def match_names(wanted: list[str], available: list[str], what: str) -> dict[str, str]:
    """Map each wanted tensor name to the one base tensor it means.

    Exact names win; otherwise the names must agree up to leading components (`model.layers.0...` vs
    `layers.0...`), and exactly one base tensor may match. Anything else is an error naming the tensor.
    """
    available_set = set(available)
    by_suffix: dict[str, list[str]] = {}
    for name in available:
        parts = name.split(".")
        for start in range(len(parts)):
            by_suffix.setdefault(".".join(parts[start:]), []).append(name)
    mapping: dict[str, str] = {}
    missing: list[str] = []
    for name in wanted:
        if name in available_set:
            mapping[name] = name
            continue
        candidates = list(by_suffix.get(name, []))
        parts = name.split(".")
        candidates += [".".join(parts[i:]) for i in range(1, len(parts)) if ".".join(parts[i:]) in available_set]
        candidates = sorted(set(candidates))
        if len(candidates) == 1:
            mapping[name] = candidates[0]
        elif candidates:
            raise WeightsError(f"{what} '{name}' matches several base tensors: {', '.join(candidates[:4])}")
        else:
            missing.append(name)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{what} '{missing[0]}'{more} has no tensor in the base model's safetensors files")
    return mapping


def base_layout(base_dir: Path) -> dict[str, list[str]]:
    """Shard file -> tensor names, in the base's own order; one entry for a single-file checkpoint."""
    index = base_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: no weight_map (tensor name -> shard file)")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        return shards
    single = base_dir / SINGLE_FILE
    if single.is_file():
        return {SINGLE_FILE: ShardReader(single).keys()}
    raise WeightsError(
        f"base model '{base_dir}' has no {SINGLE_FILE} or {INDEX_FILE}; only safetensors weights are read "
        "(pickled .bin checkpoints are refused)"
    )
