"""Read a written GGUF back with the `gguf` package and compare it with the merged folder it came from.

Runs after every export, like the merge's verification: the metadata (architecture, shape, tokenizer ids, chat
template, every token's text), the tensors every layer needs, and every tensor, dequantized and compared with the
merged weight under the converter's layout changes (llama's q/k row order for its rope, Gemma's norm offset).
Memory: the file is memory-mapped and large tensors are compared a block of rows at a time, so about one block is in
flight. `llama_cpp_stops` then has llama.cpp itself load the file (when it is installed).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_tune.export.errors import VerificationError
from lora_tune.export.gguf_file import GgufFile, GgufTensor, read_gguf
from lora_tune.export.gguf_quantize import llama_cpp_module

# Largest |gguf - merged| / max|merged| a tensor may show in each stored type: the type's rounding with a margin.
# f16 keeps 11 significant bits (2^-11 = 4.9e-4 relative); bf16 8 (3.9e-3); q8_0 rounds to 1/127 of each block's
# largest value (half a step: 3.9e-3 of the block max, which is at most the tensor max) with an f16 scale, after an
# f16 step when llama.cpp's quantizer writes it (k-quant exports): 4.6e-3 measured there.
MAX_RELATIVE = {"F32": 1e-6, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 6e-3}
# Other (k-)quant types: relative RMS error. A 4-bit k-quant measures about 0.03-0.1; a wrong tensor about 1.4.
MAX_RELATIVE_RMS = 0.25
ROWS_PER_BLOCK = 4096
# GGUF token types (llama.cpp's llama_token_type) under which llama.cpp matches a token's text as one token when it
# tokenizes with special tokens parsed: control, user-defined; and the unknown token.
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4
# llama.cpp's sliding-window layout for architectures whose GGUF carries no per-layer pattern: every n-th layer is
# global, the others slide (llama_hparams::set_swa_pattern(n), as llama.cpp's gemma2/gemma3 loaders call it).
SWA_EVERY = {"gemma2": 2, "gemma3": 6}
# Architectures (the catalog's) whose every block has the same tensors in llama.cpp, and which all need the token
# embedding and the final norm: a block lacking a tensor the others have is a file llama.cpp cannot load. Others
# (MoE models with dense first layers, interleaved layers) are left to llama.cpp's own load (`llama_cpp_stops`).
UNIFORM_ARCHS = frozenset({"llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"})
GLOBAL_TENSORS = ("token_embd.weight", "output_norm.weight")
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
GGML_LOG_LEVEL_ERROR = 4  # ggml.h of llama-cpp-python 0.3.36's llama.cpp (its _logger.py comment, 3, is older)

log = logging.getLogger(__name__)


@dataclass
class TensorCheck:
    name: str
    source: str  # the merged tensor it was compared with
    kind: str  # the GGUF storage type
    relative_max: float  # max |gguf - merged| / max |merged|
    relative_rms: float  # rms(gguf - merged) / rms(merged)
    transform: str = "as is"


@dataclass
class GgufCheck:
    """What the read-back found; `lora-tune export` prints it and the model card carries it."""

    architecture: str
    tensors: list[TensorCheck] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)  # tensors llama.cpp computes from the config (rope factors)
    tokens: int = 0
    metadata: list[str] = field(default_factory=list)  # fields that were compared and matched
    seconds: float = 0.0

    def worst(self, kind: str | None = None) -> TensorCheck | None:
        chosen = [t for t in self.tensors if kind is None or t.kind == kind]
        return max(chosen, key=lambda t: t.relative_max, default=None)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per storage type: tensors, the largest relative max and rms error."""
        out: dict[str, dict[str, float]] = {}
        for t in self.tensors:
            entry = out.setdefault(t.kind, {"tensors": 0, "relative_max": 0.0, "relative_rms": 0.0})
            entry["tensors"] += 1
            entry["relative_max"] = max(entry["relative_max"], t.relative_max)
            entry["relative_rms"] = max(entry["relative_rms"], t.relative_rms)
        return out


def merged_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, loaded once per export: the read-back, the stop-token check and the Modelfile each
    need it, and a 128k-token vocabulary takes about a second to load. Keyed by the tokenizer files' times, so a
    changed folder loads anew; callers only read it."""
    files = [p for p in folder.iterdir() if p.name.startswith(("tokenizer", "chat_template", "special_tokens"))]
    return _load_tokenizer(str(folder.resolve()), max((p.stat().st_mtime_ns for p in files), default=0))


@functools.lru_cache(maxsize=2)
def _load_tokenizer(folder: str, _stamp: int) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def verify_gguf(gguf_path: Path, merged_dir: Path) -> GgufCheck:
    """Compare `gguf_path` with the merged transformers folder; VerificationError names what differs."""
    started = time.monotonic()
    reader = read_gguf(gguf_path)
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config) if "num_hidden_layers" not in config else config
    arch = _field(reader, "general.architecture")
    check = GgufCheck(architecture=arch)
    _check_metadata(reader, arch, config, merged_dir, check)
    _check_layer_pattern(reader, arch, config)
    _check_blocks(reader, arch, merged_dir, gguf_path)
    names = _source_names(arch, int(config["num_hidden_layers"]), merged_dir)
    read_merged = _merged_reader(merged_dir)
    for tensor in reader.tensors:
        source = names.get(tensor.name)
        if source is None:
            check.generated.append(tensor.name)
            continue
        check.tensors.append(_compare(tensor, source, read_merged, config))
    _check_tensor_errors(check, gguf_path)
    _check_all_written(names, check, config, gguf_path)
    check.seconds = round(time.monotonic() - started, 1)
    return check


# ---- metadata ------------------------------------------------------------------------------------------------


def _field(reader: GgufFile, key: str) -> Any:
    return reader.fields.get(key)


def _check_metadata(reader: GgufFile, arch: str, config: dict[str, Any], merged_dir: Path, check: GgufCheck) -> None:
    expected = {
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.attention.head_count": config["num_attention_heads"],
    }
    if "num_key_value_heads" in config:
        expected[f"{arch}.attention.head_count_kv"] = config["num_key_value_heads"]
    tokenizer = merged_tokenizer(merged_dir)
    for name, id_ in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if id_ is not None and _field(reader, f"tokenizer.ggml.{name}_token_id") is not None:
            expected[f"tokenizer.ggml.{name}_token_id"] = id_
    if tokenizer.chat_template:
        expected["tokenizer.chat_template"] = tokenizer.chat_template
    for key, want in expected.items():
        got = _field(reader, key)
        if got != want:
            shown = "the run's chat template" if key.endswith("chat_template") else repr(want)
            raise VerificationError(f"GGUF field {key} is {_short(got)}, expected {shown} (from {merged_dir})")
        check.metadata.append(key)
    check.tokens = _check_tokens(reader, tokenizer)


def _check_tokens(reader: GgufFile, tokenizer: Any) -> int:
    """Every token of the tokenizer has the same text at the same id in the GGUF (the converter pads the rest)."""
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    n = len(tokenizer)
    if len(tokens) < n:
        raise VerificationError(f"the GGUF has {len(tokens)} tokens; the tokenizer has {n}")
    hf = tokenizer.convert_ids_to_tokens(list(range(n)))
    wrong = [i for i in range(n) if hf[i] is not None and tokens[i] != hf[i] and not _same_byte(tokens[i], hf[i])]
    if wrong:
        i = wrong[0]
        raise VerificationError(
            f"{len(wrong)} of {n} tokens differ between the GGUF and the tokenizer; first: id {i} is "
            f"{tokens[i]!r} in the GGUF, {hf[i]!r} in the tokenizer"
        )
    _check_added_token_types(reader, tokenizer, n)
    return n


def _check_added_token_types(reader: GgufFile, tokenizer: Any, n: int) -> None:
    """transformers reads every added token (the chat markers) as one token wherever it appears in a text; llama.cpp
    does so only for tokens typed control or user-defined. With the right text but the type 'normal' (the
    converter's SentencePiece path types added tokens from tokenizer_config.json's added_tokens_decoder, which
    transformers 5 no longer writes) llama.cpp would split '<start_of_turn>' into pieces in every chat prompt."""
    types = _field(reader, "tokenizer.ggml.token_type")
    if types is None:
        return
    added = sorted(i for i in tokenizer.added_tokens_decoder if i < n)
    plain = [i for i in added if types[i] not in (UNKNOWN, CONTROL, USER_DEFINED)]
    if plain:
        i = plain[0]
        raise VerificationError(
            f"{len(plain)} of the tokenizer's {len(added)} added tokens are ordinary text in the GGUF (type "
            f"{types[i]}), first id {i} {tokenizer.convert_ids_to_tokens(i)!r}: llama.cpp would split it into "
            "pieces where transformers reads one token"
        )


def _same_byte(gguf_token: str, hf_token: str) -> bool:
    """SentencePiece byte tokens: '<0x0A>' in both, or written as the byte itself by some converters."""
    return gguf_token.upper() == hf_token.upper() and gguf_token.startswith("<0x")


def _check_layer_pattern(reader: GgufFile, arch: str, config: dict[str, Any]) -> None:
    """Which layers slide, as llama.cpp will run them, against the model's own layer types. The converter writes
    no pattern for Gemma 2/3 and llama.cpp assumes the released models' one; a model with another layout would
    convert silently and compute other attention (and, for Gemma 3, another rope base) in those layers."""
    window = config.get("sliding_window")
    if arch == "phi3" and window and window < config.get("max_position_embeddings", 0):
        log.warning(
            "export: llama.cpp ignores Phi-3's sliding window (%d tokens): past it, it attends to the whole "
            "context where transformers attends to the window",
            window,
        )
    if arch not in SWA_EVERY or not window:
        return
    n_layers = int(config["num_hidden_layers"])
    layer_types = config.get("layer_types")
    if layer_types is None and config.get("sliding_window_pattern"):  # Gemma 3's configs before layer_types
        every = int(config["sliding_window_pattern"])
        layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)]
    if layer_types is None:
        return
    stored = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(stored, list):
        sliding = [bool(v) for v in stored]
    else:
        every = int(stored) if stored else SWA_EVERY[arch]
        sliding = [i % every < every - 1 for i in range(n_layers)]
    expected = [t == "sliding_attention" for t in layer_types]
    if sliding != expected:
        show = "".join("S" if s else "G" for s in sliding)
        raise VerificationError(
            f"llama.cpp would run the layers of this {arch} model as {show} (S sliding, G global); the model's "
            f"layer_types are {''.join('S' if s else 'G' for s in expected)}"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_blocks(reader: GgufFile, arch: str, merged_dir: Path, gguf_path: Path) -> None:
    """llama.cpp builds layer N from the tensors blk.N.* for every N below the file's block_count (config.json's
    num_hidden_layers, checked above) and refuses a file that lacks one. The tensor comparison sees only tensors the
    file or the merged folder has: a config.json that declares more layers than the weights hold passes it."""
    count = int(_field(reader, f"{arch}.block_count") or 0)
    blocks: dict[int, set[str]] = {}
    for tensor in reader.tensors:
        if match := _BLOCK.fullmatch(tensor.name):
            blocks.setdefault(int(match[1]), set()).add(match[2])
    missing = [n for n in range(count) if n not in blocks]
    if missing:
        raise VerificationError(
            f"{gguf_path.name} has no tensors for layer {missing[0]}: {merged_dir}/config.json declares {count} "
            f"layers (num_hidden_layers), its weights hold {_merged_layers(merged_dir)}; "
            "llama.cpp cannot load such a file"
        )
    if extra := sorted(n for n in blocks if n >= count):
        raise VerificationError(f"{gguf_path.name} has tensors for layer {extra[0]} beyond its block_count {count}")
    if arch in UNIFORM_ARCHS:
        _check_uniform(reader, blocks, gguf_path)


def _check_uniform(reader: GgufFile, blocks: dict[int, set[str]], gguf_path: Path) -> None:
    """A tensor absent from the file and the merged folder alike (a layer's projection lost before the merge was
    saved) passes the comparison; in these architectures every layer needs what any layer has."""
    names = {t.name for t in reader.tensors}
    if lacking := [name for name in GLOBAL_TENSORS if name not in names]:
        raise VerificationError(f"{gguf_path.name} lacks {lacking[0]}, which llama.cpp needs to load it")
    every = set().union(*blocks.values())
    for n, present in sorted(blocks.items()):
        if lacking := sorted(every - present):
            raise VerificationError(
                f"{gguf_path.name} lacks blk.{n}.{lacking[0]}, which the other layers have and llama.cpp needs"
            )


def _merged_layers(merged_dir: Path) -> int:
    return len({m[1] for name in _merged_names(merged_dir) if (m := re.search(r"\.layers\.(\d+)\.", name))})


# ---- tensors -------------------------------------------------------------------------------------------------


def _source_names(arch: str, n_blocks: int, merged_dir: Path) -> dict[str, str]:
    """GGUF tensor name -> merged tensor name, through gguf's own HF -> GGUF name map."""
    import gguf

    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise VerificationError(f"the gguf package does not know the architecture '{arch}'")
    table = gguf.get_tensor_name_map(by_name[arch], n_blocks)
    names: dict[str, str] = {}
    for hf_name in _merged_names(merged_dir):
        mapped = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            names[mapped] = hf_name
    return names


def _merged_names(merged_dir: Path) -> list[str]:
    index = merged_dir / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    from safetensors import safe_open

    with safe_open(merged_dir / "model.safetensors", framework="pt") as f:
        return list(f.keys())


# (name, start row, stop row or None for all) -> the merged tensor's rows as float32, and its row count
MergedReader = Callable[[str, int, "int | None"], np.ndarray]


def _merged_reader(merged_dir: Path) -> tuple[MergedReader, Callable[[str], int]]:
    """Readers of the merged safetensors that open the shard for each read: a mapping kept open would keep every
    page read so far in this process's resident memory, the whole model by the end."""
    from safetensors import safe_open

    index = merged_dir / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"] if index.is_file() else None

    def shard(name: str) -> Path:
        return merged_dir / (weight_map[name] if weight_map else "model.safetensors")

    def read(name: str, start: int, stop: int | None) -> np.ndarray:
        with safe_open(shard(name), framework="pt") as f:
            part = f.get_slice(name)
            values = part[start:stop] if part.get_shape() else part[:]
            return values.float().numpy()

    def rows(name: str) -> int:
        with safe_open(shard(name), framework="pt") as f:
            shape = f.get_slice(name).get_shape()
        return int(shape[0]) if shape else 1

    return read, rows


def _compare(
    tensor: GgufTensor, source: str, merged: tuple[MergedReader, Callable[[str], int]], config: dict[str, Any]
) -> TensorCheck:
    read, row_count = merged
    kind = tensor.kind_name
    rows = tensor.rows
    transforms = _transforms(tensor.name, config)
    blocked = len(transforms) == 1 and rows > ROWS_PER_BLOCK and len(tensor.shape) == 2
    if blocked and row_count(source) == rows:  # large (embeddings, output): a block of rows at a time
        stats = _Stats()
        for start in range(0, rows, ROWS_PER_BLOCK):
            stop = min(rows, start + ROWS_PER_BLOCK)
            stats.add(_dequantized(tensor, start, stop), read(source, start, stop))
        return TensorCheck(tensor.name, source, kind, stats.relative_max(), stats.relative_rms())
    got = _dequantized(tensor, 0, rows)
    weights = read(source, 0, None)
    tried = []
    for label, transform in transforms:
        stats = _Stats()
        stats.add(got, transform(weights).reshape(got.shape))
        tried.append(TensorCheck(tensor.name, source, kind, stats.relative_max(), stats.relative_rms(), label))
    return min(tried, key=lambda t: t.relative_max)


def _transforms(name: str, config: dict[str, Any]) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """How the converter may have laid the merged tensor out: as is, or (llama's rope) q/k rows reordered within
    each head, or (Gemma's norms) 1 added. Each candidate is compared; the closest is reported with its name."""
    options: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = [("as is", lambda w: w)]
    heads = config.get("num_attention_heads")
    if name.endswith(("attn_q.weight", "attn_q.bias")) and heads:
        options.append(("rope row order", lambda w: _rope_rows(w, heads)))
    if name.endswith(("attn_k.weight", "attn_k.bias")) and heads:
        kv = config.get("num_key_value_heads") or heads
        options.append(("rope row order", lambda w: _rope_rows(w, kv)))
    if name.endswith("norm.weight"):
        options.append(("+1 (norm offset)", lambda w: w + 1))
    return options


def _rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from HF's two-halves rope layout to llama.cpp's interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantized(tensor: GgufTensor, start: int, stop: int) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    block = tensor.read_rows(start, stop)
    if block.dtype != np.uint8:
        return np.asarray(block, dtype=np.float32)
    return np.asarray(dequantize(np.asarray(block), GGMLQuantizationType(tensor.kind)), dtype=np.float32)


class _Stats:
    def __init__(self) -> None:
        self.diff_max = self.ref_max = self.diff_sq = self.ref_sq = 0.0

    def add(self, got: np.ndarray, ref: np.ndarray) -> None:
        # float32 throughout (both sides are float32 values; the sums of squares only feed an RMS ratio, where
        # float32 accumulation is ample), which halves the read-back's time against float64.
        got, ref = got.reshape(-1).astype(np.float32, copy=False), ref.reshape(-1).astype(np.float32, copy=False)
        if got.shape != ref.shape:
            raise VerificationError(f"shape mismatch: GGUF {got.shape} vs merged {ref.shape}")
        diff = got - ref
        self.diff_max = max(self.diff_max, float(np.abs(diff).max(initial=0.0)))
        self.ref_max = max(self.ref_max, float(np.abs(ref).max(initial=0.0)))
        self.diff_sq += float(np.dot(diff, diff))
        self.ref_sq += float(np.dot(ref, ref))

    def relative_max(self) -> float:
        return self.diff_max / self.ref_max if self.ref_max else self.diff_max

    def relative_rms(self) -> float:
        return (self.diff_sq / self.ref_sq) ** 0.5 if self.ref_sq else self.diff_sq**0.5


def _check_tensor_errors(check: GgufCheck, gguf_path: Path) -> None:
    for t in check.tensors:
        limit = MAX_RELATIVE.get(t.kind)
        bad = t.relative_max > limit if limit is not None else t.relative_rms > MAX_RELATIVE_RMS
        if bad:
            figure = f"max error {t.relative_max:.3g}" if limit is not None else f"rms error {t.relative_rms:.3g}"
            bound = limit if limit is not None else MAX_RELATIVE_RMS
            raise VerificationError(
                f"{gguf_path.name}: tensor {t.name} ({t.kind}) differs from the merged {t.source}: relative "
                f"{figure} > {bound:g}"
            )


def _check_all_written(names: dict[str, str], check: GgufCheck, config: dict[str, Any], gguf_path: Path) -> None:
    written = {t.name for t in check.tensors}
    missing = [hf for gguf_name, hf in names.items() if gguf_name not in written]
    if config.get("tie_word_embeddings"):
        missing = [name for name in missing if not name.endswith("lm_head.weight")]
    if missing:
        raise VerificationError(f"{gguf_path.name} lacks {len(missing)} merged tensor(s), first {missing[0]}")


def iter_checks(check: GgufCheck) -> Iterator[str]:
    """Lines for the console and the card: per storage type, tensors and worst error."""
    for kind, entry in sorted(check.summary().items()):
        yield (
            f"{kind}: {int(entry['tensors'])} tensors, max relative error {entry['relative_max']:.3g}, "
            f"max relative rms {entry['relative_rms']:.3g}"
        )


# ---- llama.cpp's own load -------------------------------------------------------------------------------------


def llama_cpp_stops(gguf_path: Path, ids: list[int]) -> set[int]:
    """Those of `ids` llama.cpp ends generation on, asked of the file loaded as llama.cpp will run it: the whole model,
    not only its vocabulary, so that a file llama.cpp cannot load (a layer's tensors missing, a wrong shape) is
    refused with llama.cpp's own reason. The weights stay memory-mapped from the file on the CPU and no context is
    made: the load costs page cache, not memory the size of the model. Needs llama-cpp-python."""
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0  # a check: nothing copied to a GPU
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
    params.use_extra_bufts = False  # no repacked copies of the weights for the CPU's kernels
    with _llama_cpp_errors(llama_cpp) as errors:
        model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
    if not model:
        version = getattr(llama_cpp, "__version__", "?")
        raise VerificationError(f"llama.cpp ({version}) cannot load {gguf_path.name}: {_reason(errors)}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return {i for i in ids if llama_cpp.llama_vocab_is_eog(vocab, i)}
    finally:
        llama_cpp.llama_model_free(model)


@contextlib.contextmanager
def _llama_cpp_errors(llama_cpp: Any) -> Iterator[list[str]]:
    """llama.cpp's error lines while inside, kept instead of printed: a failed load logs its reason and returns
    only NULL. The previous log callback is put back after."""
    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level == GGML_LOG_LEVEL_ERROR:
            errors.append(text.decode("utf-8", errors="replace").strip())

    previous, user = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user))
    llama_cpp.llama_log_set(keep, None)
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(previous, user)


def _reason(errors: list[str]) -> str:
    """llama.cpp's own words, e.g. 'check_tensor_dims: tensor 'blk.2.attn_norm.weight' not found'."""
    for line in reversed(errors):
        if "error loading model: " in line:
            return line.rsplit("error loading model: ", 1)[1]
    return errors[-1] if errors else "it gave no reason"
