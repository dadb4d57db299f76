"""The GGUF read-back's architecture checks and the converter's view of a SentencePiece folder, without llama.cpp:
added tokens (chat markers) must be typed so llama.cpp reads them as one token; Gemma 2/3's sliding layers must be
the ones llama.cpp assumes; every layer the file declares must have the tensors llama.cpp builds it from; a folder
with tokenizer.model but no added_tokens_decoder is shown to the converter with its added tokens listed, the source
untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tune.export.errors import VerificationError
from lora_tune.export.gguf import _converter_view
from lora_tune.export.gguf_file import GgufFile, GgufTensor
from lora_tune.export.gguf_verify import (
    CONTROL,
    USER_DEFINED,
    _check_added_token_types,
    _check_blocks,
    _check_layer_pattern,
)
from tests.conftest import CORPUS

NORMAL = 1


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    from lora_tune.quickstart.tiny import build_tokenizer

    return build_tokenizer(CORPUS * 20, vocab_size=320)


def _reader(**fields: object) -> GgufFile:
    return GgufFile(fields=dict(fields), tensors=[])


def test_added_tokens_typed_control_or_user_defined_pass(tokenizer) -> None:
    n = len(tokenizer)
    types = [NORMAL] * n
    for i in tokenizer.added_tokens_decoder:
        types[i] = CONTROL if tokenizer.added_tokens_decoder[i].special else USER_DEFINED
    _check_added_token_types(_reader(**{"tokenizer.ggml.token_type": types}), tokenizer, n)


def test_an_added_token_typed_as_ordinary_text_is_refused(tokenizer) -> None:
    n = len(tokenizer)
    types = [NORMAL] * n
    for i in tokenizer.added_tokens_decoder:
        types[i] = CONTROL
    marker = max(tokenizer.added_tokens_decoder)  # the last role marker
    types[marker] = NORMAL
    name = tokenizer.convert_ids_to_tokens(marker)
    with pytest.raises(VerificationError, match=f"1 of the tokenizer's .* added tokens .* id {marker} '{name}'"):
        _check_added_token_types(_reader(**{"tokenizer.ggml.token_type": types}), tokenizer, n)


def _gemma3(layers: int, every: int) -> dict:
    return {"num_hidden_layers": layers, "sliding_window": 16, "sliding_window_pattern": every}


def _alternating(layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("gemma3", _gemma3(6, 6)),  # the released Gemma 3 layout: 5 sliding, 1 global
        ("gemma3", _gemma3(12, 6)),
        ("gemma2", {"num_hidden_layers": 4, "sliding_window": 16, "layer_types": _alternating(4)}),
        ("gemma2", {"num_hidden_layers": 4, "layer_types": ["full_attention"] * 4}),  # no window: nothing slides
        ("llama", {"num_hidden_layers": 2, "sliding_window": 16, "layer_types": ["full_attention"] * 2}),
    ],
)
def test_layer_pattern_llama_cpp_assumes_passes(arch: str, config: dict) -> None:
    _check_layer_pattern(_reader(), arch, config)


@pytest.mark.parametrize(
    ("arch", "config", "shown"),
    [
        ("gemma3", _gemma3(2, 2), "SS .* SG"),  # measured: logits off by 0.24 in llama.cpp
        ("gemma3", {"num_hidden_layers": 3, "sliding_window": 16, "layer_types": ["full_attention"] * 3}, "SSS"),
        ("gemma2", {"num_hidden_layers": 2, "sliding_window": 16, "layer_types": _alternating(2)[::-1]}, "SG .* GS"),
    ],
)
def test_layer_pattern_llama_cpp_would_not_run_is_refused(arch: str, config: dict, shown: str) -> None:
    with pytest.raises(VerificationError, match=f"as {shown}"):
        _check_layer_pattern(_reader(), arch, config)


def test_a_pattern_stored_in_the_file_is_the_one_compared() -> None:
    config = _gemma3(2, 2)  # sliding, then global
    _check_layer_pattern(_reader(**{"gemma3.attention.sliding_window_pattern": [True, False]}), "gemma3", config)
    with pytest.raises(VerificationError):
        _check_layer_pattern(_reader(**{"gemma3.attention.sliding_window_pattern": [True, True]}), "gemma3", config)


def test_phi3_window_shorter_than_the_context_is_warned_of(caplog) -> None:
    config = {"num_hidden_layers": 2, "sliding_window": 2047, "max_position_embeddings": 4096}
    _check_layer_pattern(_reader(), "phi3", config)
    assert "ignores Phi-3's sliding window (2047 tokens)" in caplog.text


LAYER = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def _llama_file(block_count: int, layers: int, drop: str | None = None) -> GgufFile:
    """A Llama GGUF's table (names only): `layers` full layers, less the tensor `drop`, declaring `block_count`."""
    names = ["token_embd.weight", "output_norm.weight"]
    names += [f"blk.{n}.{part}.weight" for n in range(layers) for part in LAYER]
    tensors = [GgufTensor(name, (4, 4), 0, Path("x.gguf"), 0, 16, "float32") for name in names if name != drop]
    return GgufFile(fields={"llama.block_count": block_count}, tensors=tensors)


def test_a_file_with_every_layer_it_declares_passes(tiny_model_dir: Path) -> None:
    _check_blocks(_llama_file(2, 2), "llama", tiny_model_dir, Path("x.gguf"))


def test_a_layer_the_config_declares_but_no_weights_hold_is_refused(tiny_model_dir: Path) -> None:
    """config.json says 3 layers, the weights hold 2: the converter writes block_count 3 and two layers' tensors,
    every tensor present equals the merged one, and llama.cpp cannot load the file (missing blk.2.attn_norm)."""
    expected = f"x.gguf has no tensors for layer 2: {tiny_model_dir}/config.json declares 3 layers .* weights hold 2;"
    with pytest.raises(VerificationError, match=expected):
        _check_blocks(_llama_file(3, 2), "llama", tiny_model_dir, Path("x.gguf"))


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        ("blk.1.ffn_down.weight", "lacks blk.1.ffn_down.weight, which the other layers have"),
        ("output_norm.weight", "lacks output_norm.weight, which llama.cpp needs"),
    ],
)
def test_a_tensor_llama_cpp_needs_missing_from_both_is_refused(tiny_model_dir: Path, drop: str, expected: str) -> None:
    with pytest.raises(VerificationError, match=expected):
        _check_blocks(_llama_file(2, 2, drop), "llama", tiny_model_dir, Path("x.gguf"))


def test_layers_beyond_the_block_count_are_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(VerificationError, match="tensors for layer 2 beyond its block_count 2"):
        _check_blocks(_llama_file(2, 3), "llama", tiny_model_dir, Path("x.gguf"))


def test_layers_of_an_architecture_with_unlike_layers_are_left_to_llama_cpp(tiny_model_dir: Path) -> None:
    """deepseek2's first layers are dense and the rest MoE: their tensors differ by design."""
    table = _llama_file(2, 2, drop="blk.1.ffn_down.weight")
    table.fields = {"deepseek2.block_count": 2}
    _check_blocks(table, "deepseek2", tiny_model_dir, Path("x.gguf"))


def _sentencepiece_folder(root: Path) -> tuple[Path, object]:
    """A model folder as transformers 5 saves a SentencePiece tokenizer, plus the Hub's tokenizer.model."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    spm_dir = root / "spm"
    spm_dir.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_prefix=str(spm_dir / "tokenizer"),
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    )
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tokenizer = AutoTokenizer.from_pretrained(spm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    folder = root / "my-model"
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return folder, tokenizer


def test_converter_view_lists_the_added_tokens_of_a_sentencepiece_folder(tmp_path: Path) -> None:
    folder, tokenizer = _sentencepiece_folder(tmp_path)
    before = (folder / "tokenizer_config.json").read_text()
    assert "added_tokens_decoder" not in json.loads(before)  # what transformers 5 writes
    (tmp_path / "build").mkdir()
    view = _converter_view(folder, tmp_path / "build")
    assert view != folder and view.name == folder.name  # the converter's name-based checks see the same name
    listed = json.loads((view / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    start = tokenizer.convert_tokens_to_ids("<start_of_turn>")
    assert listed[str(start)] == {
        **dict(content="<start_of_turn>", special=True, lstrip=False, rstrip=False),
        **dict(normalized=False, single_word=False),
    }
    assert set(listed) == {str(i) for i in tokenizer.added_tokens_decoder}
    assert (view / "tokenizer.model").resolve() == (folder / "tokenizer.model").resolve()
    assert (view / "tokenizer.model").is_symlink() and (view / "config.json").is_symlink()
    assert (folder / "tokenizer_config.json").read_text() == before  # the source is never changed


def test_converter_reads_the_folder_itself_when_nothing_is_missing(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "build").mkdir()
    assert _converter_view(tiny_model_dir, tmp_path / "build") == tiny_model_dir  # BPE: no tokenizer.model
    folder, _ = _sentencepiece_folder(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"3": {"content": "<start_of_turn>", "special": True}}  # as the Hub ships
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert _converter_view(folder, tmp_path / "build") == folder
