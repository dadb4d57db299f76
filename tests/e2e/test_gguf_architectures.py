"""Every architecture of the recipe catalog exports to GGUF and runs in llama.cpp as it runs in transformers.

For each model_type the catalog uses (and SmolLM2's tied-embedding Llama), a tiny random float32 model is built from
the shrunken catalog config (tests/helpers.py), with a tokenizer of the family's kind: the real Llama 3 / Qwen2.5 /
Qwen3 vocabularies (scripts/real_material.py caches them), and for the SentencePiece families (Gemma 2/3, Phi-3,
Mistral) a SentencePiece model trained here in the family's style, shipped as tokenizer.model beside tokenizer.json
as on the Hub (llama.cpp's converter requires it for Gemma 2 and Phi-3), with the family's real chat template.
`lora-tune export FOLDER --quant f16` converts it; llama.cpp then loads the file and is compared with transformers:
general.architecture, token ids, and logits on the same ids.

Findings that shape the cases (llama-cpp-python 0.3.36):
- Gemma 3: the converter writes no sliding-window layer pattern and llama.cpp assumes Gemma 3's own (5 sliding
  layers, then 1 global); the tiny Gemma 3 keeps that pattern over 6 layers. A 2-layer copy with pattern 2 converts
  without complaint and is wrong by 0.24 in the logits; the export's read-back now refuses it.
- Phi-3: llama.cpp ignores Phi-3's sliding window (llama.cpp PR 13676) and attends to the whole context; the tiny
  model keeps the shipped window (2047), longer than the test's sequences, as in real use up to 2047 tokens.
- SentencePiece vocabularies with a dummy prefix (Phi-3, Mistral): llama.cpp, like SentencePiece itself, starts every
  text fragment (the text's start and the text after each special token) with the prefix space; transformers 5 only
  the input's first fragment, and not when it already starts with a space. Ids agree on text without special tokens
  and without leading whitespace; chat prompts differ by those prefix spaces (upstream, in either library).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lora_tune.cli import main
from lora_tune.plan.catalog import list_catalog, shipped_config
from tests.conftest import CORPUS
from tests.helpers import CATALOG, catalog_by_architecture, require_llama_cpp, shrink

pytestmark = pytest.mark.slow  # eight conversions through llama.cpp's converter: 90 s on 2 cores

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / ".cache" / "real-material" / "tokenizers"

# Measured here (llama-cpp-python 0.3.36, GGML_NATIVE=OFF; f16 file vs the float32 model, llama.cpp also rounding
# activations to f16) over the three sequences below, logits up to 0.6-1.5 in magnitude: max |logit difference|
# llama 4.6e-4, llama-tied (SmolLM2) 6.4e-4, qwen2 5.3e-4, qwen3 6.8e-4, mistral 3.8e-4, gemma2 7.8e-4,
# gemma3 (6 layers) 1.4e-3, phi3 3.9e-4. The bound leaves over 3x on the worst; a wrong layout moves them by 0.2-1
# (Gemma 3 with another layer pattern: 0.24; Phi-3 with a window shorter than the sequence: 0.18).
LOGIT_TOLERANCE = 5e-3


@dataclass(frozen=True)
class Case:
    model_type: str
    catalog_model: str  # the catalog model whose shipped config is shrunk
    arch: str  # llama.cpp's general.architecture
    tokenizer: str  # a cached real vocabulary, or "spm-<style>" for one trained here


def _cases() -> dict[str, Case]:
    """One case per catalog model_type, plus SmolLM2 (a Llama with tied embeddings)."""
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
    arch |= {"gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
    vocab = {"llama": "llama-3.1", "qwen2": "qwen2.5", "qwen3": "qwen3", "mistral": "spm-mistral"}
    vocab |= {"gemma2": "spm-gemma", "gemma3_text": "spm-gemma", "phi3": "spm-phi3"}
    # Text families: a vision run's GGUF export is refused in one line (tests/e2e/test_vision.py).
    text = {t: e for t, e in catalog_by_architecture().items() if e.recipe.vision is None}
    cases = {t: Case(t, e.model, arch.get(t, "?"), vocab.get(t, "?")) for t, e in text.items()}
    smollm = next(e for e in list_catalog(CATALOG) if e.name.startswith("smollm/"))
    cases["llama-tied"] = Case("llama", smollm.model, "llama", "llama-3.1")
    return cases


CASES = _cases()


# ---- tokenizers ----------------------------------------------------------------------------------------------

SPM_TEXTS = [
    *CORPUS,
    "Hello there, name a fruit. A plum, a fig or a kiwi.",
    "你好，世界 日本語のテキスト 한국어 문장",
    "def f(x):\n    return x ** 2",
    "emoji 🎉🚀 mixed",
]
# The family's layout of special ids and pieces; chat markers as the real tokenizers have them.
SPM_STYLES: dict[str, dict[str, Any]] = {
    "gemma": {
        "spm": {
            **dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3),
            **dict(pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>"),
            "add_dummy_prefix": False,
            "control_symbols": ["<mask>"],
            "user_defined_symbols": ["<start_of_turn>", "<end_of_turn>"],
        },
        "class": "GemmaTokenizer",
        "specials": ["<start_of_turn>", "<end_of_turn>"],
        "template": "gemma",
    },
    "mistral": {
        "spm": {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1, "control_symbols": ["[INST]", "[/INST]"]},
        "class": "LlamaTokenizer",
        "specials": ["[INST]", "[/INST]"],
        "template": "mistral",
    },
    "phi3": {  # the chat tokens come after the SentencePiece vocabulary, as added tokens (32000+ in Phi-3)
        "spm": {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1},
        "class": "LlamaTokenizer",
        "specials": ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"],
        "template": "phi-3",
        "eos": "<|endoftext|>",
    },
}


def _spm_tokenizer(style: str, root: Path) -> tuple[Any, Path]:
    """A tiny SentencePiece BPE model (byte fallback) in the family's style, as a transformers tokenizer."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    spec = SPM_STYLES[style]
    root.mkdir(parents=True)
    options = {"add_dummy_prefix": True, **spec["spm"]}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TEXTS * 4),
        model_prefix=str(root / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        **options,
    )
    (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": spec["class"]}))
    tokenizer = AutoTokenizer.from_pretrained(root)  # transformers converts tokenizer.model
    tokenizer.add_special_tokens({"additional_special_tokens": spec["specials"]})
    if "eos" in spec:
        tokenizer.eos_token = tokenizer.pad_token = spec["eos"]
    tokenizer.chat_template = (REAL / spec["template"] / "chat_template.jinja").read_text(encoding="utf-8")
    return tokenizer, root / "tokenizer.model"


def _tokenizer(name: str, root: Path) -> tuple[Any, Path | None]:
    from transformers import AutoTokenizer

    if name.startswith("spm-"):
        return _spm_tokenizer(name.removeprefix("spm-"), root / name)
    return AutoTokenizer.from_pretrained(REAL / name), None


# ---- the exported cases --------------------------------------------------------------------------------------


def _tiny_config(case: Case, tokenizer: Any) -> dict[str, Any]:
    small = shrink(shipped_config(case.catalog_model, CATALOG), tokenizer)
    if case.model_type == "gemma3_text":  # llama.cpp's fixed Gemma 3 layout: 5 sliding layers, then 1 global
        small.update(num_hidden_layers=6, sliding_window_pattern=6)
    if case.model_type == "phi3":  # llama.cpp ignores Phi-3's window: keep the shipped one, past the sequences
        small["sliding_window"] = shipped_config(case.catalog_model, CATALOG)["sliding_window"]
    return small


def _build(name: str, case: Case, root: Path) -> dict[str, Any]:
    """The tiny model saved as a transformers folder, exported as f16; the in-memory model and tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer, sentencepiece_model = _tokenizer(case.tokenizer, root)
    torch.manual_seed(0)
    config = AutoConfig.for_model(case.model_type, **_tiny_config(case, tokenizer))
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = root / f"tiny-{name}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if sentencepiece_model is not None:  # transformers 5 saves tokenizer.json only; the Hub ships both
        shutil.copy(sentencepiece_model, folder / "tokenizer.model")
    started = time.monotonic()
    assert main(["export", str(folder), "--quant", "f16", "--output", str(root / "gguf")]) == 0
    print(f"{name}: exported in {time.monotonic() - started:.1f}s")
    return {"model": model, "tokenizer": tokenizer, "gguf": root / "gguf" / f"tiny-{name}-F16.gguf", "folder": folder}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Any:
    """name -> the exported case, built on first use and kept for the module."""
    require_llama_cpp()
    for name in ("llama-3.1", "qwen2.5", "qwen3", "gemma", "mistral", "phi-3"):
        if not (REAL / name / "tokenizer.json").is_file():
            pytest.skip(f"real tokenizer not in {REAL / name}; run: python scripts/real_material.py")
    built: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in built:
            built[name] = _build(name, CASES[name], tmp_path_factory.mktemp(name))
        return built[name]

    return get


def _load(path: Path, **kwargs: Any) -> Any:
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=128, n_threads=2, verbose=False, **kwargs)


def test_every_catalog_architecture_has_a_case() -> None:
    """A model_type new to the catalog fails here until it is given its llama.cpp architecture and tokenizer."""
    assert {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"} <= set(CASES)
    unknown = {name: case for name, case in CASES.items() if "?" in (case.arch, case.tokenizer)}
    assert unknown == {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gguf_architecture_is_llama_cpps(name: str, exported) -> None:
    from lora_tune.export.gguf_file import read_gguf

    case = exported(name)
    assert read_gguf(case["gguf"]).fields["general.architecture"] == CASES[name].arch


# Text without special tokens or leading whitespace: every tokenizer agrees with llama.cpp on it.
PLAIN = [
    "Hello, world! The quick brown fox.",
    "你好，世界。日本語のテキスト",
    "emoji 🎉🚀 mixed 👩‍💻 and 🦀",  # 🦀 and 👩‍💻 are not in the tiny vocabularies: byte fallback
    "tabs\tand\nnewlines\n\n trailing   ",
    "1234567890 3.14159",
    "Ünïcödé àccents ñ ß",
]
# Where SentencePiece's dummy prefix differs between llama.cpp and transformers 5 (see the module docstring).
PREFIXED = ["   leading spaces", " ", "\n starts with a newline"]


def _chat(tokenizer: Any) -> list[str]:
    turns = [
        {"role": "user", "content": "Name a fruit like fig or kiwi."},
        {"role": "assistant", "content": "A plum."},
    ]
    return [
        tokenizer.apply_chat_template(turns, tokenize=False),
        tokenizer.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True),
    ]


def _dummy_prefix(name: str) -> bool:
    return CASES[name].tokenizer in ("spm-mistral", "spm-phi3")


@pytest.mark.parametrize("name", sorted(CASES))
def test_llama_cpp_tokenizes_as_transformers(name: str, exported) -> None:
    case = exported(name)
    tokenizer = case["tokenizer"]
    strings = PLAIN if _dummy_prefix(name) else [*PLAIN, *PREFIXED, *_chat(tokenizer)]
    llm = _load(case["gguf"], vocab_only=True)
    try:
        got = {s: llm.tokenize(s.encode(), add_bos=False, special=True) for s in strings}
    finally:
        llm.close()
    expected = {s: tokenizer(s, add_special_tokens=False)["input_ids"] for s in strings}
    differ = [s for s in strings if got[s] != expected[s]]
    print(f"{name}: {len(strings) - len(differ)} of {len(strings)} strings tokenize alike")
    assert differ == [], f"first: {differ[0]!r}: llama.cpp {got[differ[0]]}, transformers {expected[differ[0]]}"


def _sequences(tokenizer: Any) -> list[list[int]]:
    """A chat prompt, mixed scripts, and a text longer than the tiny sliding windows (16)."""
    texts = [
        _chat(tokenizer)[1],
        "Plain text 你好 🎉 with spaces\n",
        "the quick brown fox jumps over the lazy dog; the sky is blue. count: one two three four five six",
    ]
    return [tokenizer(t, add_special_tokens=t is not texts[0])["input_ids"] for t in texts]


@pytest.mark.parametrize("name", sorted(CASES))
def test_f16_logits_match_transformers(name: str, exported) -> None:
    import torch

    case = exported(name)
    llm = _load(case["gguf"], logits_all=True)
    worst = scale = 0.0
    try:
        for ids in _sequences(case["tokenizer"]):
            with torch.no_grad():
                reference = case["model"](torch.tensor([ids])).logits[0].float().numpy()
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)])
            worst = max(worst, float(np.abs(got - reference).max()))
            scale = max(scale, float(np.abs(reference).max()))
    finally:
        llm.close()
    print(f"{name}: max |logit difference| llama.cpp vs transformers {worst:.3g} (logits up to {scale:.3g})")
    assert worst < LOGIT_TOLERANCE


RUN_RECIPE = """\
model:
  name: {base}
  dtype: float32
  attn_implementation: eager  # Gemma 2's logit soft-capping, as its catalog recipes set
quantization:
  bits: 4
adapter:
  r: 4
  alpha: 8
datasets:
  - path: {data}
training:
  max_steps: 2
  batch_size: 2
  max_length: 64
  eval_strategy: "no"
  save_strategy: "no"
  gradient_checkpointing: false
output_dir: {out}
"""


def test_a_qlora_run_on_a_sentencepiece_family_exports_with_its_chat_markers_special(exported, tmp_path) -> None:
    """A run's adapter folder has no tokenizer.model (transformers 5 does not save one), which llama.cpp's converter
    needs for Gemma 2: the merge takes the base's, and the chat markers reach llama.cpp as single tokens."""
    from transformers import GenerationConfig

    from lora_tune.export.gguf_file import read_gguf
    from tests.conftest import write_jsonl

    case = exported("gemma2")
    tokenizer = case["tokenizer"]
    base = tmp_path / "base"
    shutil.copytree(case["folder"], base)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    GenerationConfig(eos_token_id=stops).save_pretrained(base)  # as Gemma's instruct models stop
    rows = [
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "A fig."}]} for text in PLAIN
    ]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RUN_RECIPE.format(base=base, data=data, out=tmp_path / "run"))
    assert main(["train", str(recipe)]) == 0
    assert not (tmp_path / "run" / "adapter" / "tokenizer.model").exists()
    assert main(["export", str(tmp_path / "run"), "--quant", "f16", "--output", str(tmp_path / "gguf")]) == 0
    path = tmp_path / "gguf" / "run-F16.gguf"
    assert read_gguf(path).fields["tokenizer.ggml.model"] == "llama"  # SentencePiece, from tokenizer.model
    llm = _load(path, vocab_only=True)
    try:
        marker = llm.tokenize(b"<start_of_turn>user", add_bos=False, special=True)
    finally:
        llm.close()
    assert marker[0] == tokenizer.convert_tokens_to_ids("<start_of_turn>")
