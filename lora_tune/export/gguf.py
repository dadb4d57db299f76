"""`export_gguf(source, output, quant)`: a run or a merged folder as a GGUF file for llama.cpp, Ollama, LM Studio.

Steps: a run is merged first (streaming, verified: `merge`) into a build folder inside the output folder -> llama.cpp's
own converter writes f16/bf16/q8_0 (`gguf_converter`); k-quants convert to f16 and go through llama.cpp's quantizer
(`gguf_quantize`) -> the file is read back and compared with the merged weights (`gguf_verify`) and, when llama.cpp
is installed, its end-of-generation tokens with the ones the run trained -> rename into place -> Modelfile, model
card and export.json beside it. The .gguf appears under its name only when complete; a killed export leaves a
marked `.export-*` build folder that the next export to the same folder removes. The output folder is new, empty or
one exports wrote (its marker lists what they wrote); anything else in it is refused before any work.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.errors import LoraTuneError
from lora_tune.export.errors import ExportError, ExportOptionError, VerificationError
from lora_tune.export.gguf_card import gguf_card
from lora_tune.export.gguf_converter import OUTTYPES, convert
from lora_tune.export.gguf_quantize import K_QUANTS, llama_cpp_module, quantize
from lora_tune.export.gguf_verify import GgufCheck, iter_checks, llama_cpp_stops, merged_tokenizer, verify_gguf
from lora_tune.export.merging import merge
from lora_tune.export.ollama import modelfile
from lora_tune.model.stops import generation_stops, read_generation_stops
from lora_tune.model.weights import check_model_folder
from lora_tune.recipe.load import read_yaml
from lora_tune.run.layout import RunDir, write_json_atomic
from lora_tune.run.locks import held
from lora_tune.run.outputs import (
    OutputKind,
    check_overlap,
    check_replaceable,
    make_build_dir,
    make_dir,
    record,
    refuse_foreign,
    remove_leftovers,
    write_text_atomic,
)

log = logging.getLogger(__name__)

QUANTS = ("f16", "bf16", "q8_0", *K_QUANTS)
RECORD = "export.json"  # every file exported to the folder, with its figures; the card is written from it
MODELFILE = "Modelfile"
CARD = "README.md"
LOCK = ".export.lock"  # one export at a time per folder
BUILD_PREFIX = ".export-"  # the build folder inside the output folder (marked: lora_tune.run.outputs)
# The output folder (lora_tune.run.outputs): several exports (one .gguf per quant) share it; its marker lists the
# .gguf files, and the companions are fixed names. A folder holding anything else is refused.
GGUF_FOLDER = OutputKind(
    "GGUF export folder", "output", ".lora-tune-export", fixed=frozenset({RECORD, MODELFILE, CARD, LOCK})
)


@dataclass
class GgufResult:
    """What one export wrote and measured."""

    path: Path
    quant: str
    bytes: int
    source: str
    merged: bool  # True when a run was merged first
    check: GgufCheck
    stops: list[str] = field(default_factory=list)  # end-of-turn tokens llama.cpp ends generation on
    stops_checked: bool = False  # False when llama.cpp is not installed to ask
    seconds: float = 0.0
    convert_seconds: float = 0.0
    converter_peak_mib: float = 0.0
    merge_seconds: float = 0.0


def export_gguf(
    source: str | Path,
    output: str | Path | None = None,
    *,
    quant: str = "q8_0",
    merge_dtype: str = "bf16",
    overwrite: bool = False,
) -> GgufResult:
    """Write SOURCE (a run directory or a merged folder) as one GGUF file in the `output` folder."""
    started = time.monotonic()
    if quant not in QUANTS:
        raise ExportOptionError("quant", f"expected one of {', '.join(QUANTS)}, got '{quant}'")
    if quant in K_QUANTS:
        llama_cpp_module()  # before a merge of many minutes: say now what to install
    source = Path(source)
    is_run = _kind(source)
    output = Path(output) if output is not None else default_output(source)
    target = output / f"{_model_name(source)}-{quant.upper()}.gguf"
    _check_output(output, target, source, is_run, overwrite=overwrite)  # every refusal before any work
    _refuse_vision(source, is_run)
    make_dir(output, "output")
    record(output, GGUF_FOLDER)  # the folder is lora-tune's from here on (its lock too); what it writes is listed
    with held(output / LOCK, "output", output):
        _check_output(output, target, source, is_run, overwrite=overwrite)  # again: decided under the lock
        remove_leftovers(output, lambda name: name.startswith(BUILD_PREFIX), f"export to '{output}'")
        build = make_build_dir(output, BUILD_PREFIX)
        try:
            result = _export(source, is_run, build, target, quant, merge_dtype)
            result.seconds = round(time.monotonic() - started, 1)
            _write_companions(output, result, build / "merged" if is_run else source)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return result


def _refuse_vision(source: Path, is_run: bool) -> None:
    """A vision-language model is refused in one line: llama.cpp takes its language model and an `mmproj` file for
    the tower and projector, which this export does not write (docs/vision.md)."""
    if is_run:  # the recipe's own text: a broken recipe is the export's to report, as before
        try:
            vision = read_yaml(RunDir(source).recipe).data.get("vision") is not None
        except (LoraTuneError, OSError, AttributeError):
            vision = False
    else:
        vision = (source / "preprocessor_config.json").is_file() or (source / "processor_config.json").is_file()
    if vision:
        raise ExportError(
            f"{source}: a vision-language model; GGUF export writes text models only (llama.cpp needs the language "
            "model plus an mmproj file for the vision tower, which lora-tune does not write); use `lora-tune merge`"
        )


def format_gguf(result: GgufResult) -> str:
    """What an export wrote and measured: the file, its size and timings, what was read back, the stop tokens
    llama.cpp ends on, the companions, and the commands to run the file next."""
    folder = result.path.parent
    lines = [
        f"GGUF written to {result.path}  ({result.quant}, {result.bytes / 2**20:,.1f} MiB, {result.seconds:.1f}s: "
        f"merge {result.merge_seconds:.1f}s, convert {result.convert_seconds:.1f}s, verify "
        f"{result.check.seconds:.1f}s; converter peak {result.converter_peak_mib:,.0f} MiB)",
        f"  read back: {len(result.check.tensors)} tensors and {result.check.tokens} tokens equal the merged model's",
        *(f"    {line}" for line in iter_checks(result.check)),
    ]
    stops = ", ".join(result.stops) or "-"
    lines.append(
        f"  llama.cpp stops on: {stops}"
        if result.stops_checked
        else f"  stops on {stops} (not asked of llama.cpp: it is not installed)"
    )
    lines.append(f"Also written: {folder / MODELFILE}, {folder / CARD}")
    lines.append(f"Next:\n  ollama create NAME -f {folder / MODELFILE}\n  lora-tune serve {result.path}")
    return "\n".join(lines)


def default_output(source: Path) -> Path:
    """SOURCE-gguf beside the source."""
    return source.with_name(f"{source.name}-gguf")


def _check_output(output: Path, target: Path, source: Path, is_run: bool, *, overwrite: bool) -> None:
    """The output folder is new, empty or an export folder that holds only what exports wrote; the .gguf name is
    free (or, with --overwrite, an earlier export's file); export.json is the record exports write."""
    if output.exists() and not output.is_dir():
        raise ExportOptionError(
            "output", f"'{output}' is a file, expected a folder (for the .gguf, Modelfile and card)"
        )
    if is_run and output.resolve().is_relative_to(source.resolve()):  # the merge would build inside the run
        raise ExportOptionError(
            "output",
            f"'{output}' is inside the run directory '{source}'; choose a folder outside it "
            f"(the default is '{default_output(source)}')",
        )
    check_overlap(output, [source], "output")
    refuse_foreign(output, GGUF_FOLDER)
    check_replaceable(output, [target.name, RECORD, MODELFILE, CARD], "output")
    if target.exists() and not overwrite:
        raise ExportError(f"{target} exists; pass --overwrite to replace it")
    _read_record(output)


def _read_record(output: Path) -> dict[str, Any]:
    """export.json of the folder ({"files": {name: entry}}), or a new one; anything else is refused in one line."""
    path = output / RECORD
    if not path.is_file():
        return {"files": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{path}: not the record lora-tune exports write ({exc}); move it away") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        got = f"a JSON {type(data).__name__}" if not isinstance(data, dict) else 'an object without "files"'
        raise ExportError(f"{path}: expected the record lora-tune exports write, got {got}; move it away")
    return data


def _kind(source: Path) -> bool:
    """True for a run directory, False for a merged folder; anything else is refused in one line."""
    if RunDir(source).is_run():
        return True
    if (source / "config.json").is_file():
        check_model_folder(source)  # a broken config.json or shard is named now, not by the converter later
        return False
    raise ExportError(
        f"{source}: neither a lora-tune run (recipe.yaml) nor a model folder (config.json); pass a run directory "
        "or a folder written by `lora-tune merge`"
    )


def _model_name(source: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", source.resolve().name).strip("-") or "model"


def _export(source: Path, is_run: bool, build: Path, target: Path, quant: str, merge_dtype: str) -> GgufResult:
    merge_seconds = 0.0
    merged_dir = source
    if is_run:
        merged = merge(source, build / "merged", dtype=merge_dtype)
        merged_dir, merge_seconds = merged.output, merged.seconds
    partial = build / target.name
    name = _llama_cpp_name(target.stem, merged_dir)
    converter_input = _converter_view(merged_dir, build)
    if quant in OUTTYPES:
        conversion = convert(converter_input, partial, quant, name)
    else:
        conversion = convert(converter_input, build / "f16.gguf", "f16", name)
        log.info("export: quantizing to %s with llama.cpp", quant)
        quantize(conversion.path, partial, quant)
        (build / "f16.gguf").unlink()
    check = verify_gguf(partial, merged_dir)
    stops, checked = _stops_in_llama_cpp(partial, merged_dir)
    record(target.parent, GGUF_FOLDER, [target.name])  # listed first: an unlisted .gguf would be the user's
    partial.replace(target)  # the only moment the file appears under its name
    return GgufResult(
        path=target,
        quant=quant,
        bytes=target.stat().st_size,
        source=str(source),
        merged=is_run,
        check=check,
        stops=stops,
        stops_checked=checked,
        convert_seconds=conversion.seconds,
        converter_peak_mib=conversion.peak_rss_mib,
        merge_seconds=merge_seconds,
    )


def _llama_cpp_name(name: str, merged_dir: Path) -> str:
    """general.name for the file. llama.cpp tokenizes a Phi-3 vocabulary as Phi-3 does (stripping the whitespace
    after special tokens) only when general.name contains 'phi-3' or 'phi3', so a Phi-3 fine-tune gets it."""
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") == "phi3" and not re.search(r"phi-?3", name, re.IGNORECASE):
        return f"phi-3-{name}"
    return name


def _converter_view(merged_dir: Path, build: Path) -> Path:
    """The folder the converter reads: `merged_dir` itself, or, when a file of it must say more to the converter,
    a view of it (links to its files, under the same folder name so the converter's name-based checks see the
    same) with those files rewritten. The source folder is never changed."""
    candidates = {"config.json": _with_architectures, "tokenizer_config.json": _with_added_tokens}
    rewritten = {name: content for name, make in candidates.items() if (content := make(merged_dir)) is not None}
    if not rewritten:
        return merged_dir
    view = build / "converter-input" / merged_dir.resolve().name
    view.mkdir(parents=True)
    for path in merged_dir.iterdir():
        if path.name not in rewritten:
            (view / path.name).symlink_to(path.resolve())
    for name, content in rewritten.items():
        write_json_atomic(view / name, content)
    return view


def _with_architectures(merged_dir: Path) -> dict[str, Any] | None:
    """The converter picks its model class from config.json's `architectures`, which a config saved by hand may
    lack; then the view's config names the causal-LM class of its model_type."""
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("architectures"):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
    if class_name is None:
        raise ExportError(f"{merged_dir}/config.json names no architectures and no model_type transformers knows")
    return {**config, "architectures": [class_name]}


def _with_added_tokens(merged_dir: Path) -> dict[str, Any] | None:
    """For a SentencePiece vocabulary (tokenizer.model: Gemma, Phi-3, Mistral, Llama 2) the converter takes the kind
    of each added token (the chat markers) from tokenizer_config.json's added_tokens_decoder, which transformers 5
    no longer writes: without it '<start_of_turn>' is typed as ordinary text, and llama.cpp splits it into pieces in
    every chat prompt (the read-back refuses such a file). Then the view's tokenizer_config lists them, from the
    tokenizer itself."""
    path = merged_dir / "tokenizer_config.json"
    if not (merged_dir / "tokenizer.model").is_file() or not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("added_tokens_decoder"):
        return None
    added = merged_tokenizer(merged_dir).added_tokens_decoder
    if not added:
        return None
    fields = ("content", "lstrip", "rstrip", "normalized", "single_word", "special")
    listed = {str(i): {f: getattr(token, f) for f in fields} for i, token in sorted(added.items())}
    log.info("export: listing the %d added tokens in tokenizer_config.json for llama.cpp's converter", len(added))
    return {**config, "added_tokens_decoder": listed}


def _stops_in_llama_cpp(gguf_path: Path, merged_dir: Path) -> tuple[list[str], bool]:
    """The texts of the tokens the merged model stops on (`model.stops.generation_stops`) that llama.cpp ends
    generation on, and whether llama.cpp (when installed) was asked; without it, all of them.

    The first, the token that closes an assistant turn in the chat template (else EOS), must end generation in
    llama.cpp, or the exported model runs on past its answers; other stop tokens the merged model lists (a base's
    spare EOS variants) that llama.cpp does not stop on are only logged."""
    tokenizer = merged_tokenizer(merged_dir)
    stops = generation_stops(tokenizer, read_generation_stops(merged_dir)[0])
    texts = [str(t) for t in tokenizer.convert_ids_to_tokens(stops)]
    try:
        llama_cpp_module()
    except ExportError:
        return texts, False
    ends = llama_cpp_stops(gguf_path, stops)  # the whole model loaded: a file llama.cpp cannot load is refused
    if stops and stops[0] not in ends:
        raise VerificationError(
            f"llama.cpp would not stop generating at {texts[0]}, which closes the assistant's turns in "
            "the chat template; the exported file would run on past the end of its answers"
        )
    ignored = [text for i, text in zip(stops, texts, strict=True) if i not in ends]
    if ignored:
        log.warning("export: llama.cpp does not stop on %s (listed in generation_config.json)", ", ".join(ignored))
    return [text for i, text in zip(stops, texts, strict=True) if i in ends], True


def _write_companions(output: Path, result: GgufResult, merged_dir: Path) -> None:
    """export.json (every file in the folder), the Modelfile for this file, and the model card for them all."""
    files = _read_record(output)
    files["files"][result.path.name] = _record_entry(result)
    files["files"] = {name: entry for name, entry in files["files"].items() if (output / name).is_file()}
    write_json_atomic(output / RECORD, files)
    write_text_atomic(output / MODELFILE, modelfile(result.path.name, merged_dir, result.stops))
    write_text_atomic(output / CARD, gguf_card(files, merged_dir))


def _record_entry(result: GgufResult) -> dict[str, Any]:
    return {
        "quant": result.quant,
        "bytes": result.bytes,
        "source": result.source,
        "merged_from_run": result.merged,
        "verification": {
            "tensors": len(result.check.tensors),
            "tokens": result.check.tokens,
            "metadata": result.check.metadata,
            "by_type": result.check.summary(),
            "generated": result.check.generated,
            "llama_cpp_stops": result.stops if result.stops_checked else None,
        },
        "seconds": {
            "total": result.seconds,
            "merge": result.merge_seconds,
            "convert": result.convert_seconds,
            "verify": result.check.seconds,
        },
        "converter_peak_mib": result.converter_peak_mib,
    }


__all__ = ["GgufResult", "QUANTS", "export_gguf"]
