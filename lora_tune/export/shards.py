"""A folder's safetensors tensors by name, read one tensor (or a few rows of one) at a time, in float32.

The layer-by-layer verification reads each decoder layer's tensors when it runs that layer, only the embedding rows
its inputs use, and the output matrix in row blocks, so no whole model and no whole vocabulary matrix is held.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lora_tune.model.weights import ShardReader, WeightsError, base_layout, torch_dtype

if TYPE_CHECKING:
    import torch

ROW_BLOCK_BYTES = 8 * 2**20  # the output matrix is read this many bytes (stored dtype) at a time


class ShardTensors:
    """Every tensor of a folder's safetensors files (single file or index), by name."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.readers: dict[str, ShardReader] = {}
        for shard, names in base_layout(folder).items():
            reader = ShardReader(folder / shard)
            self.readers.update(dict.fromkeys(names, reader))

    def __contains__(self, name: str) -> bool:
        return name in self.readers

    def names(self) -> list[str]:
        return list(self.readers)

    def shape(self, name: str) -> list[int]:
        return list(self.readers[name].shape(name))

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in float32 when it is floating."""
        tensor = self.readers[name].read(name)
        return tensor.float() if tensor.is_floating_point() else tensor

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor, in float32, read with one seek each (the embedding rows the inputs use)."""
        import torch

        reader, info = self.readers[name], self.readers[name].header[name]
        width = info["shape"][1]
        out = torch.empty((len(ids), width), dtype=torch_dtype(info["dtype"]))
        row_bytes = out[0].numel() * out.element_size()
        with open(reader.path, "rb") as handle:
            for index, row in enumerate(ids.tolist()):
                handle.seek(reader.data_start + info["data_offsets"][0] + row * row_bytes)
                if handle.readinto(memoryview(out[index].view(torch.uint8).numpy())) != row_bytes:
                    raise WeightsError(f"{reader.path}: tensor '{name}' is truncated")
        return out.float()

    def row_blocks(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, float32 block) over a 2-D tensor, about ROW_BLOCK_BYTES of stored data per block."""
        import torch

        reader, info = self.readers[name], self.readers[name].header[name]
        rows, width = info["shape"]
        dtype = torch_dtype(info["dtype"])
        row_bytes = width * torch.empty(0, dtype=dtype).element_size()
        step = max(1, ROW_BLOCK_BYTES // max(1, row_bytes))
        with open(reader.path, "rb") as handle:
            for start in range(0, rows, step):
                block = torch.empty((min(step, rows - start), width), dtype=dtype)
                handle.seek(reader.data_start + info["data_offsets"][0] + start * row_bytes)
                size = block.numel() * block.element_size()
                if handle.readinto(memoryview(block.view(-1).view(torch.uint8).numpy())) != size:
                    raise WeightsError(f"{reader.path}: tensor '{name}' is truncated")
                yield start, block.float()
