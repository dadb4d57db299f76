#!/usr/bin/env python
"""Fetch the real tokenizers and chat templates that tests/e2e/test_real_templates.py checks lora-tune against.

    python scripts/real_material.py [--cache .cache/real-material] [--sdist PATH]

The llama-cpp-python 0.3.36 source distribution (package registry; about 77 MB; nothing is compiled) carries real
vocabularies (`vendor/llama.cpp/models/ggml-vocab-*.gguf`) and real chat templates copied from the models' own
repositories (`vendor/llama.cpp/models/templates/*.jinja`). This script downloads it with pip (or takes `--sdist`),
extracts only the members in MEMBERS, checks each one's SHA-256, and converts each family's vocabulary into a plain
Hugging Face tokenizer folder (`tokenizers/<family>/`, with the family's own template set) so that tests load it in
about a second instead of converting a GGUF each time (10-15 s for a 150k-token vocabulary).

Where the sdist has no exact vocabulary of a catalog model, FAMILIES says which stand-in is used and why (e.g. Gemma
2's 256k vocabulary is absent: Gemma 4's, whose turn markers sit at Gemma 3's ids 105/106, gets Gemma's names back).

LLaMA-Factory's public demo data sets (`data/` of its 0.9.5 source distribution on the package registry, 5.2 MB)
land in `llamafactory/`: the rows its quickstart trains on, which tests/e2e/test_demo_datasets.py reads through
lora-tune's data path at several max_length values (no row of them may trip the per-row memory bound).

Idempotent: with the cache in place and its hashes right it does nothing (well under a second). Exit status 1 when
the material cannot be had (registry unreachable, hash mismatch); `make test` then carries on and those tests skip
(except under CI=true, where the demo-set tests fail).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# The llama.cpp release pinned once: the GGUF exporter's converter comes from the same sdist, and MEMBERS below
# are that sdist's files.
from lora_tune.export.gguf_converter import SDIST, SDIST_FILE, SDIST_SHA256
from lora_tune.run.layout import sha256_file

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "real-material"
MODELS = "vendor/llama.cpp/models/"  # inside the sdist's top folder

# Extracted file (relative to MODELS) -> its SHA-256, as read from the 0.3.36 sdist.
MEMBERS = {
    "ggml-vocab-llama-bpe.gguf": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
    "ggml-vocab-qwen2.gguf": "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",
    "ggml-vocab-phi-3.gguf": "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326",
    "ggml-vocab-llama-spm.gguf": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
    "ggml-vocab-gemma-4.gguf": "58b1ba0b57f3b4d7c468ba4ffd91ad85190346a3d7ad7e71d1cabaae8a14bb65",
    "ggml-vocab-qwen35.gguf": "63ed952ff338996cf0bdf24a7b10015124273f75c6dc9bb427356aa3f67ec62c",
    "templates/meta-llama-Llama-3.1-8B-Instruct.jinja": (
        "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65"
    ),
    "templates/Qwen-Qwen2.5-7B-Instruct.jinja": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
    "templates/Qwen-Qwen3-0.6B.jinja": "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5",
    "templates/google-gemma-2-2b-it.jinja": "ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6",
    "templates/microsoft-Phi-3.5-mini-instruct.jinja": (
        "78d976a442bcde2f0be15aafbb8e3050e1104f86732266f68403251b89982a90"
    ),
    "templates/mistralai-Mistral-Nemo-Instruct-2407.jinja": (
        "e4676cb56dffea7782fd3e2b577cfaf1e123537e6ef49b3ec7caa6c095c62272"
    ),
    # Reasoning models (tests/e2e/test_real_templates.py's thinking tests; docs/data.md, reasoning data).
    "templates/Qwen-QwQ-32B.jinja": "5ed15374ce53e19a7798710736a2c9fe41c79f7385e8421a2080d6575a80ef1b",
    "templates/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": (
        "bbe594884b44d740667ee65a70bc8d333a565eab3d63ea59f291ea73ada84ba6"
    ),
    "templates/deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja": (
        "dd2675619a64a449cdcdd2b93e605a0a50764cee41e344f244752bc93643936c"
    ),
    "templates/Qwen3.5-4B.jinja": "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715",
    "templates/HuggingFaceTB-SmolLM3-3B.jinja": "19eacf64569032f07644ea92c8e2a87af06ee7008147557302c31e474912ca97",
}

# Qwen2.5's added tokens at their real ids; the GGUF names those slots [PAD151646] ... (Qwen3 adds the last four).
_QWEN25 = {
    151657: "<tool_call>",
    151658: "</tool_call>",
}
_QWEN3 = {**_QWEN25, 151665: "<tool_response>", 151666: "</tool_response>", 151667: "<think>", 151668: "</think>"}
# The DeepSeek-R1 distills keep their base's vocabulary and put DeepSeek's control tokens (and the think tags) at
# these ids of it; the sdist has the bases' vocabularies (Qwen2.5, Llama 3), not the distills' tokenizers.
_R1_QWEN = {
    151643: "<｜end▁of▁sentence｜>",
    151644: "<｜User｜>",
    151645: "<｜Assistant｜>",
    151646: "<｜begin▁of▁sentence｜>",
    151648: "<think>",
    151649: "</think>",
}
_R1_LLAMA = {
    128000: "<｜begin▁of▁sentence｜>",
    128001: "<｜end▁of▁sentence｜>",
    128011: "<｜User｜>",
    128012: "<｜Assistant｜>",
    128013: "<think>",
    128014: "</think>",
}
# SmolLM3 is Llama 3.2's vocabulary with ChatML and the think tags in reserved slots.
_SMOLLM3 = {128002: "<think>", 128003: "</think>", 128011: "<|im_start|>", 128012: "<|im_end|>"}


@dataclass(frozen=True)
class Family:
    """A catalog family's tokenizer: a GGUF vocabulary, tokens renamed or added to match the model, its template."""

    vocab: str  # MEMBERS key
    template: str  # MEMBERS key
    renames: dict[int, str] = field(default_factory=dict)  # token id -> the model's own name for it
    added: tuple[str, ...] = ()  # special tokens the model has and the stand-in vocabulary lacks (appended)
    eos: str | None = None  # the instruct model's EOS where its tokenizer_config differs from the GGUF's
    bos: str | None = None  # likewise its BOS (the template writes bos_token)


FAMILIES = {
    "llama-3.1": Family(
        "ggml-vocab-llama-bpe.gguf", "templates/meta-llama-Llama-3.1-8B-Instruct.jinja", eos="<|eot_id|>"
    ),
    "qwen2.5": Family("ggml-vocab-qwen2.gguf", "templates/Qwen-Qwen2.5-7B-Instruct.jinja", _QWEN25, eos="<|im_end|>"),
    "qwen3": Family("ggml-vocab-qwen2.gguf", "templates/Qwen-Qwen3-0.6B.jinja", _QWEN3, eos="<|im_end|>"),
    # Gemma 4's vocabulary is Gemma 3's with <start_of_turn>/<end_of_turn> (ids 105/106) renamed <|turn>/<turn|>.
    "gemma": Family(
        "ggml-vocab-gemma-4.gguf",
        "templates/google-gemma-2-2b-it.jinja",
        {105: "<start_of_turn>", 106: "<end_of_turn>"},
    ),
    "phi-3": Family("ggml-vocab-phi-3.gguf", "templates/microsoft-Phi-3.5-mini-instruct.jinja"),
    # Mistral v0.3's SentencePiece vocabulary is absent: Llama 2's, with Mistral's control tokens appended.
    "mistral": Family(
        "ggml-vocab-llama-spm.gguf",
        "templates/mistralai-Mistral-Nemo-Instruct-2407.jinja",
        added=(
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ),
    ),
    # Reasoning models. QwQ-32B is Qwen2.5's vocabulary with Qwen3's four added tokens, as its own tokenizer is.
    "qwq": Family("ggml-vocab-qwen2.gguf", "templates/Qwen-QwQ-32B.jinja", _QWEN3, eos="<|im_end|>"),
    "r1-distill-qwen": Family(
        "ggml-vocab-qwen2.gguf",
        "templates/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
        _R1_QWEN,
        eos="<｜end▁of▁sentence｜>",
        bos="<｜begin▁of▁sentence｜>",
    ),
    "r1-distill-llama": Family(
        "ggml-vocab-llama-bpe.gguf",
        "templates/deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja",
        _R1_LLAMA,
        eos="<｜end▁of▁sentence｜>",
        bos="<｜begin▁of▁sentence｜>",
    ),
    # The sdist's qwen35 vocabulary (151,936 tokens, its own pre-tokenizer name) lacks the think tags: put at
    # Qwen3's ids. transformers reads it with the Qwen2 pre-tokenizer.
    "qwen3.5": Family("ggml-vocab-qwen35.gguf", "templates/Qwen3.5-4B.jinja", _QWEN3, eos="<|im_end|>"),
    "smollm3": Family(
        "ggml-vocab-llama-bpe.gguf", "templates/HuggingFaceTB-SmolLM3-3B.jinja", _SMOLLM3, eos="<|im_end|>"
    ),
}
# LLaMA-Factory's demo sets: the sdist pinned by version and hash, and each extracted member's hash.
DEMO_SDIST, DEMO_SDIST_FILE = "llamafactory==0.9.5", "llamafactory-0.9.5.tar.gz"
DEMO_SDIST_SHA256 = "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f"
DEMO_DATA = "data/"  # inside the sdist's top folder
DEMO_FOLDER = "llamafactory"  # in the cache
DEMO_MEMBERS = {
    "alpaca_en_demo.json": "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
    "alpaca_zh_demo.json": "d5a4be46ae70d23a461ffc16048069324c0865ee9aa0c8730e21ac4b65ea0f08",
    "identity.json": "fd029da7dd3df283ed034c82375d16d125a7b07cf1cb0316d03fb8743057d5f2",
    "glaive_toolcall_en_demo.json": "8b84773e44e71881f32490080350734cad3069dc227eafd771ccfb80732f6437",
    "glaive_toolcall_zh_demo.json": "d5bbc25b250ff7578ea339abe90a612511866d9beb1ea3b66d094b4f250c9c50",
    "mllm_demo.json": "0732db8e2351bc22233268e2956bed1f66c75343c27bdc08b80b2a47e12c7f24",
    "c4_demo.jsonl": "f51528081ef22279f2840c02c4cd7cdfc372138be0817c5b8714d200af692b78",
    "dpo_en_demo.json": "b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3",
    "dpo_zh_demo.json": "9ea7206bc1a45df8b7811d1fc02d5555c65379d05905f343da88f221ff145376",
    "kto_en_demo.json": "9891687dea7c00e54af2e39534085c151ce3462d073574eeff2af927cc56fb74",
}
STAMP = "converted.json"  # in each tokenizer folder: the transformers version and member hashes it was made from


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=CACHE, help="folder to fill (default: %(default)s)")
    parser.add_argument("--sdist", type=Path, default=None, help=f"a downloaded {SDIST_FILE} to use")
    args = parser.parse_args(argv)
    cache: Path = args.cache
    failed = False
    try:
        if not all(_has(cache, name, digest) for name, digest in MEMBERS.items()):
            _extract(_sdist(cache, args.sdist), cache)
        made = [name for name, family in FAMILIES.items() if _convert(cache, name, family)]
        done = f"converted {', '.join(made)}" if made else "up to date"
        print(f"real material in {cache}: {done}")
    except RuntimeError as e:
        print(f"real material: {e}", file=sys.stderr)
        failed = True
    try:  # apart from the tokenizers: either can be had without the other
        demo = cache / DEMO_FOLDER
        if not all(_has(demo, name, digest) for name, digest in DEMO_MEMBERS.items()):
            _extract_demo_sets(_sdist(cache, None, DEMO_SDIST, DEMO_SDIST_FILE, DEMO_SDIST_SHA256), demo)
            print(f"real material: LLaMA-Factory's demo sets in {demo}")
    except RuntimeError as e:
        print(f"real material: {e}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


def _has(cache: Path, name: str, digest: str) -> bool:
    path = cache / name
    return path.is_file() and sha256_file(path) == digest


def _sdist(
    cache: Path, given: Path | None, spec: str = SDIST, file: str = SDIST_FILE, digest: str = SDIST_SHA256
) -> Path:
    """The sdist `spec` (`file` once downloaded): the one given, the cached copy, else downloaded with pip into the
    cache; checked against `digest` either way."""
    path = given or cache / "sdist" / file
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
        done = subprocess.run([*command, spec, "-d", str(path.parent)], capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"could not download {spec} (the package registry unreachable?): {tail}")
    if sha256_file(path) != digest:
        raise RuntimeError(f"{path} has sha256 {sha256_file(path)}, expected {digest}")
    return path


def _extract_demo_sets(sdist: Path, folder: Path) -> None:
    """The DEMO_MEMBERS of LLaMA-Factory's data/ folder, each checked against its hash before it lands in `folder`."""
    with tarfile.open(sdist, "r:gz") as tar:
        for info in tar:
            parts = info.name.split("/", 1)
            name = parts[1].removeprefix(DEMO_DATA) if len(parts) == 2 and parts[1].startswith(DEMO_DATA) else None
            if name not in DEMO_MEMBERS or not info.isfile():
                continue
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            if hashlib.sha256(data).hexdigest() != DEMO_MEMBERS[name]:
                raise RuntimeError(f"{DEMO_SDIST_FILE}: {name} does not have the recorded sha256 {DEMO_MEMBERS[name]}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    missing = [name for name, digest in DEMO_MEMBERS.items() if not _has(folder, name, digest)]
    if missing:
        raise RuntimeError(f"{DEMO_SDIST_FILE} lacks {', '.join(missing)}")


def _extract(sdist: Path, cache: Path) -> None:
    """Only the MEMBERS, each checked against its hash before it lands in the cache."""
    with tarfile.open(sdist, "r:gz") as tar:
        for info in tar:
            parts = info.name.split("/", 1)
            name = parts[1].removeprefix(MODELS) if len(parts) == 2 and parts[1].startswith(MODELS) else None
            if name not in MEMBERS or not info.isfile():
                continue
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            if hashlib.sha256(data).hexdigest() != MEMBERS[name]:
                raise RuntimeError(f"{SDIST_FILE}: {name} does not have the recorded sha256 {MEMBERS[name]}")
            target = cache / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    missing = [name for name, digest in MEMBERS.items() if not _has(cache, name, digest)]
    if missing:
        raise RuntimeError(f"{SDIST_FILE} lacks {', '.join(missing)}")


def _convert(cache: Path, name: str, family: Family) -> bool:
    """Write tokenizers/<name>/ from the family's GGUF unless it is there, from the same inputs; True if written."""
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError("converting the vocabularies needs transformers (and gguf): pip install -e '.[dev]'") from e
    folder = cache / "tokenizers" / name
    stamp = {
        "transformers": transformers.__version__,
        "vocab": MEMBERS[family.vocab],
        "template": MEMBERS[family.template],
        "renames": {str(k): v for k, v in family.renames.items()},
        "added": list(family.added),
        "eos": family.eos,
        **({"bos": family.bos} if family.bos is not None else {}),  # absent for the first families: stamps kept
    }
    if (folder / STAMP).is_file() and json.loads((folder / STAMP).read_text()) == stamp:
        return False
    tokenizer = _load_gguf(cache, family)
    tokenizer.chat_template = (cache / family.template).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        Path(tmp).rename(folder)
        Path(tmp).mkdir()  # for TemporaryDirectory's clean-up
    return True


def _load_gguf(cache: Path, family: Family):  # noqa: ANN202 - a transformers tokenizer
    """The GGUF vocabulary as a fast tokenizer, with the family's renames and added special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    # The tokenizer alone: AutoTokenizer would also parse the GGUF's model config, which fails for gemma4.
    architecture, vocab, config = get_gguf_tokenizer(str(cache / family.vocab))
    backend, extra = convert_gguf_tokenizer(architecture, vocab)
    if family.renames:
        backend = Tokenizer.from_str(_renamed(backend.to_str(), backend, family.renames))
    config = {k: v for k, v in {**config, **extra}.items() if k != "chat_template"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **config)
    if family.added:
        tokenizer.add_special_tokens({"additional_special_tokens": list(family.added)})
    if family.eos is not None:
        tokenizer.eos_token = family.eos
    if family.bos is not None:
        tokenizer.bos_token = family.bos
    return tokenizer


def _renamed(text: str, backend, renames: dict[int, str]) -> str:  # noqa: ANN001 - a tokenizers.Tokenizer
    """The tokenizer JSON with each renamed id's token text replaced, in the vocabulary and the added tokens."""
    data = json.loads(text)
    for token_id, new in renames.items():
        old = backend.id_to_token(token_id)
        for added in data.get("added_tokens", []):
            if added["id"] == token_id:
                added["content"] = new
        vocab = data["model"]["vocab"]
        if isinstance(vocab, dict):
            vocab[new] = vocab.pop(old)
        else:  # Unigram: [piece, score] pairs, by id
            vocab[token_id][0] = new
    return json.dumps(data, ensure_ascii=False)


if __name__ == "__main__":
    sys.exit(main())
