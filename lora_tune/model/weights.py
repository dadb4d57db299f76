"""Read and write safetensors files one tensor at a time, with plain file reads and writes (no mmap).

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

from lora_tune.export.errors import ExportError

if TYPE_CHECKING:
    import torch

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


def torch_dtype(code: str) -> torch.dtype:
    import torch

    if code not in _NAMES:
        raise ExportError(f"safetensors dtype {code} is not supported by the streaming merge")
    return getattr(torch, _NAMES[code])


def dtype_code(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for code, candidate in _NAMES.items():
        if candidate == name:
            return code
    raise ExportError(f"cannot write {dtype} to safetensors")


class ShardReader:
    """Header of a safetensors file, and its tensors read one by one."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        self.header: dict[str, Any] = header
        self.data_start = 8 + length

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
                    raise ExportError(f"{self.path}: tensor '{name}' is truncated")
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
                raise ExportError(
                    f"internal: tensor '{name}' {tensor.dtype} {list(tensor.shape)} does not match the header "
                    f"('{want_name}' {want_dtype} {list(want_shape)})"
                )
            if tensor.numel():
                handle.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
    if next(expected, None) is not None:
        raise ExportError(f"internal: {path.name} ended before all its tensors were written")
    return offset
