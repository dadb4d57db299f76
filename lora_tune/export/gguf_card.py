"""The model card (README.md) of a GGUF export folder: every file with its quant type, size and verification
figures, how to run it in llama.cpp, Ollama and llama-cpp-python, then the merged model's own card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def gguf_card(record: dict[str, Any], merged_dir: Path) -> str:
    front, body = _split_card(merged_dir / "README.md")
    tags = list(dict.fromkeys([*(front.get("tags") or []), "gguf", "llama.cpp", "lora-tune"]))
    meta = {key: front[key] for key in ("base_model", "license", "language") if key in front}
    meta.update({"tags": tags, "library_name": "gguf"})
    files = record["files"]
    first = next(iter(files), "MODEL.gguf")
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        "# GGUF files",
        "",
        "Written by `lora-tune export --format gguf` with llama.cpp's own converter; each file was read back and "
        "compared with the merged weights (relative error per storage type: largest |difference| / largest |weight|).",
        "",
        "| file | quant | size | tensors checked | tokens checked | largest relative error | llama.cpp stops on |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in files.items():
        lines.append(_row(name, entry))
    lines += [
        "",
        "## Run it",
        "",
        "```bash",
        f"llama-cli -m {first} -cnv            # llama.cpp, with the chat template stored in the file",
        "ollama create my-model -f Modelfile && ollama run my-model",
        "```",
        "",
        "```python",
        "from llama_cpp import Llama",
        "",
        f'llm = Llama("{first}")',
        'print(llm.create_chat_completion([{"role": "user", "content": "Hello!"}])["choices"][0]["message"])',
        "```",
    ]
    if body.strip():
        lines += ["", "## The model", "", body.strip()]
    return "\n".join(lines) + "\n"


def _row(name: str, entry: dict[str, Any]) -> str:
    verification = entry["verification"]
    worst = max((v["relative_max"] for v in verification["by_type"].values()), default=0.0)
    stops = verification.get("llama_cpp_stops")
    stops_text = ", ".join(f"`{s}`" for s in stops) if stops else "not checked (llama.cpp not installed)"
    size = entry["bytes"] / 2**20
    return (
        f"| {name} | {entry['quant']} | {size:,.1f} MiB | {verification['tensors']} | {verification['tokens']} | "
        f"{worst:.3g} | {stops_text} |"
    )


def _split_card(path: Path) -> tuple[dict[str, Any], str]:
    """The merged card's YAML front matter and its body (empty when the folder has no card)."""
    if not path.is_file():
        return {}, ""
    text = path.read_text(encoding="utf-8")
    if text.startswith("---\n") and "\n---" in text[4:]:
        head, _, body = text[4:].partition("\n---")
        return yaml.safe_load(head) or {}, body.lstrip("\n")
    return {}, text
