"""lora_tune.export.gguf_file reads what the gguf package writes, exactly as the gguf package's own GGUFReader does:
every field type (scalars, strings, arrays of numbers and of strings), tensor names, shapes, kinds and data (f32,
f16 and q8_0 blocks), and refuses what is not a GGUF file."""

from __future__ import annotations

from pathlib import Path

import gguf  # a core dependency: no skip when missing
import numpy as np
import pytest

from lora_tune.export.gguf_file import read_gguf

FIELDS = {
    "test.u8": ("add_uint8", 250),
    "test.i8": ("add_int8", -120),
    "test.u16": ("add_uint16", 65000),
    "test.i16": ("add_int16", -32000),
    "test.u32": ("add_uint32", 4_000_000_000),
    "test.i32": ("add_int32", -2_000_000_000),
    "test.u64": ("add_uint64", 2**63 + 5),
    "test.i64": ("add_int64", -(2**62)),
    "test.f32": ("add_float32", 0.1),
    "test.f64": ("add_float64", 1e-300),
    "test.bool": ("add_bool", True),
    "test.string": ("add_string", "Grüße, 世界 🎉"),
    "test.ints": ("add_array", [3, -1, 7]),
    "test.floats": ("add_array", [0.5, -2.25]),
    "test.strings": ("add_array", ["<s>", "▁hello", "", "你好", "\n"]),
    "test.empty_strings": ("add_array", []),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A small GGUF written by gguf.GGUFWriter, and the float32 values of its tensors."""
    from gguf.quants import quantize

    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    rng = np.random.default_rng(0)
    values = {
        "f32.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "f16.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "q8.weight": rng.standard_normal((2, 64)).astype(np.float32),
        "bias": rng.standard_normal(7).astype(np.float32),
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (method, value) in FIELDS.items():
        getattr(writer, method)(key, value)
    writer.add_tensor("f32.weight", values["f32.weight"])
    writer.add_tensor("f16.weight", values["f16.weight"].astype(np.float16))
    writer.add_tensor(
        "q8.weight",
        quantize(values["q8.weight"], gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    writer.add_tensor("bias", values["bias"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, values


def test_fields_equal_gguf_readers(written) -> None:
    path, _ = written
    ours = read_gguf(path).fields
    theirs = {key: field.contents() for key, field in gguf.GGUFReader(str(path)).fields.items()}
    assert set(ours) == {k for k in theirs if not k.startswith("GGUF.")}  # GGUFReader adds its header as fields
    for key in ours:
        assert ours[key] == theirs[key], key
    assert ours["test.u64"] == 2**63 + 5 and ours["test.f64"] == 1e-300  # not rounded through a narrower type
    assert ours["test.strings"] == ["<s>", "▁hello", "", "你好", "\n"]
    assert ours["general.architecture"] == "llama"


def test_tensors_equal_gguf_readers(written) -> None:
    path, _ = written
    ours = {t.name: t for t in read_gguf(path).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert list(ours) == list(theirs) == ["f32.weight", "f16.weight", "q8.weight", "bias"]
    for name, tensor in ours.items():
        assert tensor.kind == int(theirs[name].tensor_type), name
        assert tensor.shape == tuple(int(n) for n in reversed(theirs[name].shape)), name  # GGUF lists ne[] reversed
        assert np.array_equal(np.asarray(tensor.data), np.asarray(theirs[name].data).reshape(tensor.data.shape))


def test_tensor_data_decodes_to_the_written_values(written) -> None:
    from gguf.quants import dequantize

    path, values = written
    tensors = {t.name: t for t in read_gguf(path).tensors}
    assert tensors["f32.weight"].kind_name == "F32" and tensors["f16.weight"].kind_name == "F16"
    assert np.array_equal(tensors["f32.weight"].data, values["f32.weight"])
    assert np.array_equal(tensors["f16.weight"].data, values["f16.weight"].astype(np.float16))
    assert np.array_equal(tensors["bias"].data, values["bias"])
    q8 = tensors["q8.weight"]
    assert q8.kind_name == "Q8_0" and q8.shape == (2, 64) and q8.data.dtype == np.uint8
    restored = dequantize(np.asarray(q8.data), gguf.GGMLQuantizationType.Q8_0)
    # q8_0: 32 values per block, each rounded to 1/127 of the block's largest with an f16 scale
    assert restored.shape == (2, 64)
    assert np.abs(restored - values["q8.weight"]).max() < np.abs(values["q8.weight"]).max() / 127


def test_not_a_gguf_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(path)
