"""GGUF export proven by llama.cpp itself (the `llama_cpp` module of llama-cpp-python), on a QLoRA run of a tiny
Llama that uses the real Llama 3 vocabulary and chat template (scripts/real_material.py caches them).

What is compared: llama.cpp's token ids with transformers' on a few hundred strings; llama.cpp's logits with the
merged model's in transformers for f16 and q8_0; greedy tokens for f16; a held-out prompt answered through the
file's own chat template as `lora-tune generate` answers it, stopping at <|eot_id|>; a k-quant through llama.cpp's
quantizer; and the pure-Python read-back catching a corrupted tensor and a changed template.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from lora_tune.cli import main
from lora_tune.run.outputs import BUILD_MARKER
from tests.conftest import write_jsonl
from tests.helpers import gguf_llama, gguf_prompts, max_logit_difference, require_llama_cpp, tiny_llama_with_real_vocab

# Measured here (llama-cpp-python 0.3.36 built with GGML_NATIVE=OFF; torch on ATEN_CPU_CAPABILITY default, avx2 and
# native alike) over the prompts below, logits up to 1.43 in magnitude: max |logit difference| llama.cpp vs
# transformers on the fp32 merged model 2.5e-3 for f16 (llama.cpp also rounds activations to f16 for f16 weights)
# and 0.040 for q8_0. The bounds leave about 4x; a wrong tensor or rope layout moves logits by their own size.
F16_LOGIT_TOLERANCE = 1e-2
Q8_LOGIT_TOLERANCE = 0.15

FRUITS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "grape", "mango", "peach", "melon", "cherry"]
RECIPE = """\
model:
  name: {base}
  dtype: float32
quantization:
  bits: 4
adapter:
  r: 16
  alpha: 32
  dropout: 0.0
datasets:
  - path: {data}
training:
  learning_rate: 1.0e-2
  max_steps: 40
  batch_size: 8
  max_length: 64
  warmup_steps: 0
  logging_steps: 10
  eval_strategy: "no"
  save_strategy: "no"
  gradient_checkpointing: false
output_dir: {out}
"""


def _rows(pairs: list[tuple[str, str]]) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Name a fruit like {a} or {b}."},
                {"role": "assistant", "content": "Sure: a fruit."},
            ]
        }
        for a, b in pairs
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A QLoRA run on a tiny Llama with the real Llama 3 vocabulary, exported as f16 and q8_0 (merged in fp32)."""
    require_llama_cpp()
    root = tmp_path_factory.mktemp("gguf")
    base = tiny_llama_with_real_vocab(root / "base")
    pairs = [(a, b) for a in FRUITS for b in FRUITS if a != b]
    random.Random(0).shuffle(pairs)
    data = write_jsonl(root / "train.jsonl", _rows(pairs[:120]))
    write_jsonl(root / "test.jsonl", _rows(pairs[120:130]))
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(base=base, data=data, out=root / "run"))
    assert main(["train", str(recipe)]) == 0
    assert main(["merge", str(root / "run"), "--output", str(root / "merged"), "--dtype", "fp32"]) == 0
    out = root / "gguf"
    for quant in ("f16", "q8_0"):  # from the merged folder; test_run_exports_... exports the run itself
        assert main(["export", str(root / "merged"), "--quant", quant, "--output", str(out)]) == 0
    return {"root": root, "run": root / "run", "merged": root / "merged", "out": out}


def _gguf(exported: dict[str, Path], quant: str, name: str = "merged") -> Path:
    return exported["out"] / f"{name}-{quant.upper()}.gguf"


def _strings() -> list[str]:
    """A few hundred strings: ASCII, CJK, emoji, whitespace runs, digits, code and the special tokens."""
    pieces = [
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "你好，世界",
        "日本語のテキスト",
        "한국어 문장",
        "emoji 🎉🚀 mixed",
        "👩‍💻 family 👨‍👩‍👧",
        "   leading spaces",
        "trailing spaces   ",
        "tabs\tand\nnewlines\n\n\n",
        "\r\n windows \r\n",
        "1234567890 3.14159 1e-5",
        "def f(x):\n    return x ** 2",
        "can't won't it's we'll they've I'd",
        "Ünïcödé àccents ñ ß",
        "<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>",
        "<|begin_of_text|>x",
        "a<|eot_id|>b",
        "",
        " ",
        "\n",
    ]
    rng = random.Random(1)
    out = list(pieces)
    while len(out) < 300:
        out.append("".join(rng.choice(pieces) for _ in range(rng.randint(2, 4))))
    return out


def test_llama_cpp_tokenizes_as_transformers(exported) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    llm = gguf_llama(_gguf(exported, "f16"), vocab_only=True)
    try:
        mismatches = [
            s
            for s in _strings()
            if llm.tokenize(s.encode(), add_bos=False, special=True)
            != tokenizer(s, add_special_tokens=False)["input_ids"]
        ]
    finally:
        llm.close()
    assert mismatches == [], f"{len(mismatches)} of 300 strings tokenize differently, first {mismatches[0]!r}"


def _max_logit_difference(exported: dict[str, Path], quant: str) -> float:
    return max_logit_difference(exported["merged"], _gguf(exported, quant))


def test_f16_logits_match_transformers(exported) -> None:
    difference = _max_logit_difference(exported, "f16")
    print(f"f16: max |logit difference| llama.cpp vs transformers {difference:.3g}")
    assert difference < F16_LOGIT_TOLERANCE


def test_q8_0_logits_match_transformers(exported) -> None:
    difference = _max_logit_difference(exported, "q8_0")
    print(f"q8_0: max |logit difference| llama.cpp vs transformers {difference:.3g}")
    assert difference < Q8_LOGIT_TOLERANCE


def test_f16_greedy_tokens_equal_transformers(exported) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    model = AutoModelForCausalLM.from_pretrained(exported["merged"], dtype=torch.float32)
    llm = gguf_llama(_gguf(exported, "f16"))
    try:
        for ids in gguf_prompts(tokenizer):
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
            expected = out[0, len(ids) :].tolist()
            llm.reset()
            got = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                got.append(token)
                if len(got) == len(expected):
                    break
            assert got == expected
    finally:
        llm.close()


def test_held_out_prompt_answered_as_lora_tune_generate_and_stops_at_end_of_turn(exported, capsys) -> None:
    row = json.loads((exported["root"] / "test.jsonl").read_text().splitlines()[0])
    prompt = row["messages"][0]["content"]
    answers = []
    for model in ("run", "merged"):  # the adapter on its 4-bit base, and the merged folder the file was made from
        capsys.readouterr()
        assert main(["generate", str(exported[model]), prompt, "--no-stream", "--max-new-tokens", "24"]) == 0
        answers.append(capsys.readouterr().out.strip())  # the answer alone: log lines go to stderr
    expected = answers[0]
    assert answers[1] == expected
    llm = gguf_llama(_gguf(exported, "f16"))  # the chat template stored in the file renders the prompt
    try:
        reply = llm.create_chat_completion(
            [{"role": "user", "content": prompt}], temperature=0.0, top_k=1, max_tokens=24
        )["choices"][0]
    finally:
        llm.close()
    assert reply["message"]["content"].strip() == expected == "Sure: a fruit."
    assert reply["finish_reason"] == "stop"  # ended by <|eot_id|>, not by max_tokens


def test_run_exports_merged_first_and_k_quant_goes_through_llama_cpps_quantizer(exported, capsys) -> None:
    import gguf

    killed = exported["out"] / ".export-killed"  # what an export killed mid-way leaves: nothing under a .gguf name
    killed.mkdir()
    (killed / BUILD_MARKER).write_text("")  # every build folder carries it from its first moment
    (killed / "run-Q4_K_M.gguf").write_bytes(b"GGUF partial")
    capsys.readouterr()
    assert main(["export", str(exported["run"]), "--quant", "q4_k_m", "--output", str(exported["out"])]) == 0
    printed = capsys.readouterr().out
    assert "merge " in printed and "llama.cpp stops on: <|eot_id|>" in printed
    path = _gguf(exported, "q4_k_m", name="run")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    llm = gguf_llama(path)
    try:
        reply = llm.create_chat_completion([{"role": "user", "content": "Name a fruit."}], max_tokens=8, temperature=0)
    finally:
        llm.close()
    assert reply["choices"][0]["message"]["content"]
    record = json.loads((exported["out"] / "export.json").read_text())
    assert set(record["files"]) == {"merged-F16.gguf", "merged-Q8_0.gguf", "run-Q4_K_M.gguf"}
    assert not list(exported["out"].glob(".export-*"))  # this export's build folder and the killed one's are gone


def test_modelfile_and_card_describe_the_file(exported) -> None:
    modelfile = (exported["out"] / "Modelfile").read_text()
    card = (exported["out"] / "README.md").read_text()
    source = modelfile.split("FROM ./", 1)[1].split("\n", 1)[0]  # the newest export in the folder
    assert (exported["out"] / source).is_file() and 'PARAMETER stop "<|eot_id|>"' in modelfile
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in modelfile  # the llama-3 format the run trained
    for name in ("merged-F16.gguf", "merged-Q8_0.gguf"):
        assert f"| {name} |" in card
    assert "`<|eot_id|>`" in card and "hf_" not in card


def test_the_file_carries_the_chat_template_and_ids_the_run_trained_with(exported) -> None:
    from transformers import AutoTokenizer

    from lora_tune.export.gguf_file import read_gguf

    trained = AutoTokenizer.from_pretrained(exported["run"] / "adapter")
    fields = read_gguf(_gguf(exported, "q8_0")).fields
    assert fields["tokenizer.chat_template"] == trained.chat_template
    assert fields["tokenizer.ggml.bos_token_id"] == trained.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == trained.eos_token_id
    assert fields["tokenizer.ggml.tokens"][: len(trained)] == trained.convert_ids_to_tokens(list(range(len(trained))))


def test_read_back_catches_a_corrupted_tensor(exported, tmp_path) -> None:
    import gguf

    from lora_tune.export.errors import VerificationError
    from lora_tune.export.gguf_verify import verify_gguf

    broken = tmp_path / "broken.gguf"
    shutil.copy(_gguf(exported, "f16"), broken)
    tensor = next(t for t in gguf.GGUFReader(str(broken)).tensors if t.name == "blk.1.ffn_down.weight")
    with broken.open("r+b") as f:
        f.seek(tensor.data_offset + 64)
        f.write(np.full(8, 7.0, dtype=np.float16).tobytes())
    with pytest.raises(VerificationError, match="blk.1.ffn_down.weight"):
        verify_gguf(broken, exported["merged"])


def test_read_back_catches_another_chat_template(exported, tmp_path) -> None:
    from lora_tune.export.errors import VerificationError
    from lora_tune.export.gguf_verify import verify_gguf

    other = tmp_path / "merged"
    shutil.copytree(exported["merged"], other)
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(VerificationError, match="chat_template"):
        verify_gguf(_gguf(exported, "f16"), other)


def test_existing_file_is_kept_without_overwrite(exported, capsys) -> None:
    path = _gguf(exported, "f16")
    before = path.stat().st_mtime_ns
    args = ["export", str(exported["merged"]), "--quant", "f16", "--output", str(exported["out"])]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert path.stat().st_mtime_ns == before
