"""The GGUF exporter's pieces that need no llama.cpp: the Ollama templates rendered against the Jinja ones, the
converter's refusals as one line, the command line's errors, and the quant list the CLI spells out."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from lora_tune.cli import GGUF_QUANTS, main
from lora_tune.export.gguf import QUANTS
from lora_tune.export.gguf_converter import explain_failure
from lora_tune.export.ollama import GO_TEMPLATES, modelfile, template_format
from lora_tune.recipe.templates import BUILTIN_TEMPLATES

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a fruit."},
]


def test_the_cli_lists_the_exporters_quants() -> None:
    assert GGUF_QUANTS == QUANTS


def render_range_template(go: str, messages: list[dict]) -> str:
    """Ollama's rendering of the templates that are one `range .Messages` over .Role and .Content, then a tail."""
    match = re.fullmatch(r"\{\{- range \.Messages \}\}(.*?)\{\{ end \}\}(.*)", go, re.DOTALL)
    assert match, "not a plain range template"
    body, tail = match.groups()
    turns = [body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages]
    return "".join(turns) + tail


@pytest.mark.parametrize("name", ["chatml", "llama-3"])
def test_go_template_renders_what_the_jinja_template_renders(name: str, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = BUILTIN_TEMPLATES[name].source
    jinja = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    if tokenizer.bos_token:  # Ollama's tokenizer adds BOS itself (add_bos_token in the GGUF)
        jinja = jinja.removeprefix(tokenizer.bos_token)
    assert render_range_template(GO_TEMPLATES[name], CONVERSATION) == jinja


def test_every_builtin_format_has_a_go_template_with_its_markers() -> None:
    for name, template in BUILTIN_TEMPLATES.items():
        go = GO_TEMPLATES[name]
        for marker in template.markers:
            assert marker in go, (name, marker)
        assert go.count("{{") == go.count("}}")


def test_template_format_names_builtins_and_real_templates_of_their_format() -> None:
    assert template_format(BUILTIN_TEMPLATES["gemma"].source) == "gemma"
    real_llama = "{{- bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{% endfor %}"
    assert template_format(real_llama) == "llama-3"
    assert template_format("{{ messages[0].content }}") is None
    assert template_format(None) is None


def test_modelfile_names_the_file_the_template_and_quoted_stops(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"].source
    tokenizer.save_pretrained(tmp_path)
    text = modelfile("x-Q8_0.gguf", tmp_path, ["<|im_end|>", 'a"b'])
    assert "FROM ./x-Q8_0.gguf\n" in text
    assert f'TEMPLATE """{GO_TEMPLATES["chatml"]}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "a\\"b"' in text
    tokenizer.chat_template = "{{ messages[0].content }}"
    tokenizer.save_pretrained(tmp_path)
    assert "TEMPLATE" not in modelfile("x.gguf", tmp_path, []).replace("No TEMPLATE", "")


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        (
            "WARNING: ** WARNING: The BPE pre-tokenizer was not recognized!\nNotImplementedError: BPE pre-tok",
            "BPE pre",
        ),
        ("ERROR:hf-to-gguf:Model FancyForCausalLM is not supported", "cannot convert the architecture FancyForCaus"),
        ("Traceback ...\nValueError: boom", "converter failed on /m: ValueError: boom"),
    ],
)
def test_converter_refusals_become_one_line(stderr: str, expected: str) -> None:
    line = explain_failure(stderr, Path("/m"))
    assert expected in line and "\n" not in line


def test_export_of_something_that_is_no_model_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "neither a lora-tune run" in err and len(err.splitlines()) == 1


def test_k_quant_without_llama_cpp_says_what_to_install(tiny_model_dir: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    assert main(["export", str(tiny_model_dir), "--quant", "q4_k_m"]) == 2
    assert "pip install 'lora-tune[llama-cpp]'" in capsys.readouterr().err


@pytest.mark.slow  # runs llama.cpp's converter (about 5 s)
def test_a_tokenizer_llama_cpp_does_not_know_is_refused_in_one_line(tiny_model_dir: Path, tmp_path, capsys) -> None:
    assert main(["export", str(tiny_model_dir), "--quant", "f16", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not know this tokenizer's BPE pre-tokenizer" in err[0]
    assert not list((tmp_path / "out").glob("*.gguf")) and not list((tmp_path / "out").glob(".export-*"))


@pytest.mark.parametrize(
    ("model_type", "name", "expected"),
    [("phi3", "chat-Q8_0", "phi-3-chat-Q8_0"), ("phi3", "my-Phi3-Q8_0", "my-Phi3-Q8_0"), ("llama", "x-F16", "x-F16")],
)
def test_a_phi_3_file_is_named_so_llama_cpp_tokenizes_it_as_phi_3(tmp_path: Path, model_type, name, expected) -> None:
    from lora_tune.export.gguf import _llama_cpp_name

    (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    assert _llama_cpp_name(name, tmp_path) == expected


def test_an_output_inside_the_run_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("model: {name: x}\n")  # a run directory, as far as export can tell
    assert main(["export", str(run), "--output", str(run / "gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is inside the run directory" in err and f"{run}-gguf" in err and len(err.splitlines()) == 1
    assert not (run / "gguf").exists()
