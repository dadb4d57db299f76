"""The planned peak memory of a merge and its verification, from the safetensors headers alone, and the check that
it fits in the memory the machine has free, made before anything is written.

The figures are estimates that round up; they are printed so a user sees the cost before the merge starts.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lora_tune.export.errors import ExportError
from lora_tune.model.weights import ShardReader

log = logging.getLogger(__name__)

GiB = 2**30
# The Python process with torch, transformers and peft imported, measured on this project's pinned versions
# (~220 MiB with torch alone; the layer-by-layer check imports transformers for the model class).
BASELINE = 500 * 2**20
ROW_BLOCK = 3 * 8 * 2**20  # one block of the output matrix: stored bytes, its float32 copy, the logits slice
_LAYER = re.compile(r"^(?P<list>.*?layers)\.(?P<index>\d+)\.")


@dataclass
class MemoryPlan:
    merge: int  # peak bytes while the weights are merged
    verify: int  # peak bytes while verifying (0 without verification)
    how: str  # the verification that is planned, in words

    @property
    def peak(self) -> int:
        return max(self.merge, self.verify)


def plan_memory(
    base_dir: Path, layout: dict[str, list[str]], adapter_bytes: int, out_size: int, *, streaming: bool, verify: str
) -> MemoryPlan:
    """`verify` is "layerwise", "whole" or "" (none); `out_size` the output dtype's element size."""
    sizes: dict[str, tuple[int, int]] = {}  # name -> (elements, stored element size)
    for shard, names in layout.items():
        reader = ShardReader(base_dir / shard)
        for name in names:
            sizes[name] = (math.prod(reader.shape(name)), reader.dtype(name).itemsize)
    fp32_model = sum(n for n, _ in sizes.values()) * 4
    # a tensor is cast (a second copy) only when the output dtype differs from the stored one
    largest = max((n * (stored + (out_size if out_size != stored else 0)) for n, stored in sizes.values()), default=0)
    largest_update = max((n * 4 * 2 for name, (n, _) in sizes.items() if _LAYER.match(name)), default=0)
    if streaming:  # one tensor read, its float32 copy and update, its cast to the output dtype
        merge = BASELINE + adapter_bytes + largest + largest_update
    else:  # peft: the whole model in float32
        merge = BASELINE + adapter_bytes + fp32_model
    if verify == "layerwise":
        layers: dict[str, int] = {}
        for name, (n, _) in sizes.items():
            match = _LAYER.match(name)
            if match:
                layers[match.group(0)] = layers.get(match.group(0), 0) + n * 4
        # one layer's float32 tensors, plus its largest tensor twice (the stored copy being read, DoRA's B @ A)
        largest_in_layer = max((n * 4 for name, (n, _) in sizes.items() if _LAYER.match(name)), default=0)
        verify_bytes = BASELINE + adapter_bytes * 2 + max(layers.values(), default=0) + 2 * largest_in_layer
        verify_bytes += ROW_BLOCK
    elif verify == "whole":  # one float32 model at a time, with peft's wrappers around the reference
        verify_bytes = BASELINE + adapter_bytes * 2 + fp32_model
    else:
        verify_bytes = 0
    how = {"layerwise": "layer-by-layer verification", "whole": "whole-model verification"}.get(verify, "no verify")
    return MemoryPlan(merge=merge, verify=verify_bytes, how=how)


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable); None where it cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, AttributeError, OSError):
        return None


def check_memory_for_merge(plan: MemoryPlan) -> None:
    """Print the planned peak; refuse a merge whose plan does not fit in the memory available now."""
    free = available_memory()
    log.info(
        "merge: planned peak memory about %.2f GiB (merge %.2f GiB, %s %.2f GiB)%s",
        plan.peak / GiB,
        plan.merge / GiB,
        plan.how,
        plan.verify / GiB,
        f"; {free / GiB:.2f} GiB available" if free is not None else "",
    )
    if free is None or plan.peak <= free:
        return
    if plan.merge <= free:
        advice = "pass --no-verify to skip the check (it needs the most), or free memory"
    else:
        advice = "free memory or merge on a machine with more; --no-verify would not be enough"
    raise ExportError(
        f"not enough memory: the merge plans a peak of about {plan.peak / GiB:.2f} GiB, {free / GiB:.2f} GiB "
        f"available; {advice}"
    )
