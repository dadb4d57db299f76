"""The Ollama `Modelfile` written beside a GGUF export: FROM the file, the chat template in Ollama's Go-template
form, and a stop parameter per token generation stops on.

Ollama does not run Jinja: it needs the prompt format as a Go template. lora-tune writes one for each turn format it
has a built-in template for (chatml, qwen, llama-3, gemma, mistral, llama-2, alpaca), recognised from the chat
template the run trained with (the GGUF carries the same text). A template of another format gets no TEMPLATE line
and a comment saying so: Ollama then uses its own guess from the file's metadata.
"""

from __future__ import annotations

from pathlib import Path

from lora_tune.export.gguf_verify import merged_tokenizer
from lora_tune.recipe.templates import BUILTIN_TEMPLATES, builtin_for

# Plain conversations (system, user, assistant turns; no tool calls): what each format writes, in Go-template form.
_LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
_QWEN = (
    '{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system\n'
    "You are a helpful assistant.<|im_end|>\n{{ end }}" + _CHATML
)
# Formats without a system role put the system text in front of the first user turn.
_GEMMA = (
    '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}'
    '{{- else if eq .Role "user" }}<start_of_turn>user\n{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
    "{{ .Content }}<end_of_turn>\n{{- else }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}"
    "<start_of_turn>model\n"
)
_MISTRAL = (
    '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}'
    '{{- else if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
    "{{ .Content }} [/INST]{{- else }}{{ .Content }}</s>{{ end }}{{ end }}"
)
_LLAMA2 = (
    '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}'
    '{{- else if eq .Role "user" }}[INST] {{ if $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ $system = "" }}'
    "{{ end }}{{ .Content }} [/INST]{{- else }} {{ .Content }} </s>{{ end }}{{ end }}"
)
_ALPACA = (
    '{{- if and .Messages (eq (index .Messages 0).Role "system") }}{{ (index .Messages 0).Content }}\n\n'
    "{{- else }}Below is an instruction that describes a task. Write a response that appropriately completes the "
    'request.\n\n{{ end }}{{- range .Messages }}{{- if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
    '{{- else if eq .Role "assistant" }}### Response:\n{{ .Content }}</s>\n\n{{ end }}{{ end }}### Response:\n'
)
GO_TEMPLATES = {
    "llama-3": _LLAMA3,
    "chatml": _CHATML,
    "qwen": _QWEN,
    "gemma": _GEMMA,
    "mistral": _MISTRAL,
    "llama-2": _LLAMA2,
    "alpaca": _ALPACA,
}


def template_format(chat_template: str | None) -> str | None:
    """The built-in format name of a chat template: the built-in itself, or the one writing the same turns."""
    if not chat_template:
        return None
    same = next((t.name for t in BUILTIN_TEMPLATES.values() if t.source == chat_template), None)
    if same:
        return same
    similar = builtin_for(chat_template)
    return similar.name if similar else None


def modelfile(gguf_name: str, merged_dir: Path, stops: list[str]) -> str:
    """The Modelfile text for `gguf_name` (in the same folder), from the merged folder's chat template, with a stop
    parameter per token text in `stops` (those llama.cpp ends generation on: `model.stops.generation_stops`)."""
    name = template_format(merged_tokenizer(merged_dir).chat_template)
    lines = [
        "# Ollama: ollama create NAME -f Modelfile && ollama run NAME",
        f"FROM ./{gguf_name}",
    ]
    if name in GO_TEMPLATES:
        lines.append(f"# The chat format the model was trained with ({name}), for plain conversations.")
        lines.append(f'TEMPLATE """{GO_TEMPLATES[name]}"""')
    else:
        lines.append(
            "# No TEMPLATE: the trained chat template is not one lora-tune can write as an Ollama template; Ollama "
            "picks one from the file's tokenizer.chat_template. Check the prompt with `ollama show NAME --template`."
        )
    lines += [f"PARAMETER stop {_quoted(text)}" for text in dict.fromkeys(stops) if text]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
