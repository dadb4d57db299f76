"""`merge(run_dir, output)`: fold a run's adapter into its base model and write a standalone transformers folder.

Steps, top to bottom: read the run's resolved recipe -> find the base's unquantized safetensors -> lock the
destination (a second merge to it refuses), refuse it if that would lose data, remove what killed merges left beside
it, refuse if the merge would not fit -> merge into a temporary folder beside the destination (streaming for
LoRA/DoRA, peft's merge_and_unload() for other adapter types) -> config, generation config, tokenizer, model card ->
verify the logits against base + adapter -> rename into place. Nothing is pickled; an interruption leaves the
destination as it was.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.export.card import merged_card
from lora_tune.export.errors import ExportError, ExportOptionError
from lora_tune.export.memory import check_memory_for_merge, plan_memory
from lora_tune.export.result import MergeResult
from lora_tune.export.streaming import (
    AdapterPlan,
    estimate_bytes,
    merged_tensors,
    output_specs,
    read_adapter,
)
from lora_tune.export.verify import verify_merge
from lora_tune.export.vision import merge_vision
from lora_tune.export.vocab import NeedsPeftMerge, resize_to_adapter, resized_vocab
from lora_tune.methods.runtime import LINEAGE_FILE
from lora_tune.model.load import load_tokenizer, resolve_dtype
from lora_tune.model.stops import generation_stops, read_generation_stops, trained_stops
from lora_tune.model.weights import (
    INDEX_FILE,
    SINGLE_FILE,
    ShardReader,
    base_layout,
    check_adapter_folder,
    check_model_folder,
    match_names,
    resolve_base,
    write_safetensors,
)
from lora_tune.recipe.load import load_recipe
from lora_tune.run.layout import RunDir, write_json_atomic
from lora_tune.run.locks import held
from lora_tune.run.outputs import (
    BUILD_MARKER,
    OutputKind,
    check_build_slot,
    check_overlap,
    is_empty,
    make_build_dir,
    make_dir,
    record,
    refuse_foreign,
    remove_leftovers,
    replace_dir_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    import torch

    from lora_tune.recipe.schema import Recipe

log = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Files of the adapter folder that are not the tokenizer.
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"}
PROMPT_LEARNING_PEFT_TYPES = {
    "PROMPT_TUNING",
    "PREFIX_TUNING",
    "P_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "ADAPTION_PROMPT",
    "CPT",
}
DISK_MARGIN = 1.05  # weights + 5% for config, tokenizer and the card
BUILD_INFIX = ".merge-"  # the build folder beside the destination: .NAME.merge-XXXXXXXX
# The destination as an output folder (lora_tune.run.outputs): its marker lists every file the merge wrote, and a
# later merge with --overwrite replaces the folder only when it holds nothing else.
MERGED = OutputKind("merged model folder", "output", ".lora-tune-merged")


def merge(
    run_dir: str | Path,
    output: str | Path,
    *,
    dtype: str = "bf16",
    overwrite: bool = False,
    verify: bool = True,
    from_dequantized: bool = False,
) -> MergeResult:
    """Merge the run's adapter into its base and write a folder that plain `from_pretrained` loads."""
    import torch

    started = time.monotonic()
    if dtype not in DTYPES:
        raise ExportOptionError("dtype", f"expected one of {', '.join(DTYPES)}, got '{dtype}'")
    torch_dtype = getattr(torch, DTYPES[dtype])
    run, recipe, peft_type = _finished_run(RunDir(Path(run_dir)))  # 1. the run: resolved recipe and adapter

    # 2. Destination and base model. One merge at a time per destination, under a lock beside it (the destination
    # may not exist yet and is replaced whole by a rename); what killed merges left there is removed under it.
    output = Path(output)
    _check_destination(output, overwrite=overwrite, protected=[run.root])  # before the base is downloaded
    base_dir = resolve_base(recipe.model)
    check_model_folder(base_dir)  # a broken config.json or shard of the base is named before any work
    protected = [run.root, base_dir]
    _check_destination(output, overwrite=overwrite, protected=protected)  # before a lock file is put beside it
    make_dir(output.parent, "output")  # the lock, the build folder and the result all go there
    with held(merge_lock_path(output), "output", output):
        _check_destination(output, overwrite=overwrite, protected=protected)  # again: decided under the lock
        remove_leftovers(output.parent, lambda name: _is_leftover_name(name, output.name), f"merge to '{output}'")
        if recipe.vision is not None:  # an image-text-to-text base: peft's merge, verified (lora_tune.export.vision)
            return _merge_vision(run, recipe, output, dtype, torch_dtype, verify)
        layout = base_layout(base_dir)
        check_disk_for_merge(output, estimate_bytes(base_dir, layout, torch_dtype.itemsize))
        plan = _streaming_plan(run, recipe, peft_type, from_dequantized)
        check_memory_for_merge(_memory_plan(run, base_dir, layout, plan, torch_dtype, verify, from_dequantized))

        # 3. Merge into a marked build folder beside the destination; it becomes the destination only when complete.
        build = make_build_dir(output.parent, f".{output.name}{BUILD_INFIX}")
        try:
            result = _merged_weights(
                run, recipe, base_dir, layout, plan, peft_type, build, torch_dtype, from_dequantized
            )
            result.output, result.dtype = output, dtype
            plan = None  # the merge's copy of the adapter, updated in place; the verification reads its own
            finish_config(base_dir, build, DTYPES[dtype], untie=bool(result.untied), vocab_size=result.vocab_size)
            copy_tokenizer(run.adapter, build, recipe, base_dir)
            write_generation_stops(run, build)
            _copy_lineage(run, build)

            # 4. Verify: the merged folder must compute what base + adapter computes.
            if verify:
                verify_merge(build, base_dir, run.adapter, recipe, dtype, result, from_dequantized=from_dequantized)

            # 5. Model card and the marker listing every file, then the rename that makes it all appear at once.
            write_text_atomic(build / "README.md", merged_card(run, recipe, base_dir, result))
            record(build, MERGED, [entry.name for entry in build.iterdir() if entry.name != BUILD_MARKER])
            result.seconds = round(time.monotonic() - started, 1)
            replace_dir_atomic(build, output)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        return result


def _merge_vision(
    run: RunDir, recipe: Recipe, output: Path, dtype: str, torch_dtype: Any, verify: bool
) -> MergeResult:
    build = make_build_dir(output.parent, f".{output.name}{BUILD_INFIX}")
    try:
        result = merge_vision(run, recipe, build, output, dtype=dtype, torch_dtype=torch_dtype, verify=verify)
        record(build, MERGED, [entry.name for entry in build.iterdir() if entry.name != BUILD_MARKER])
        replace_dir_atomic(build, output)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return result


def _finished_run(run: RunDir) -> tuple[RunDir, Recipe, str]:
    """The run, its resolved recipe and its adapter's peft type; refuses what has no adapter a merge can fold."""
    if run.is_run() and (run.model / "config.json").is_file():
        raise ExportError(
            f"{run.root}: partial or full fine-tuning saved the whole model in model/; there is no adapter to merge "
            "(load that folder with from_pretrained, or push it)"
        )
    if not run.is_run() or not (run.adapter / "adapter_config.json").is_file():
        raise ExportError(f"{run.root}: not a finished lora-tune run (no recipe.yaml or adapter/adapter_config.json)")
    # A broken adapter_config.json or adapter_model.safetensors is named here, before the base is fetched.
    adapter_config = check_adapter_folder(run.adapter)
    recipe = load_recipe(run.recipe, check_paths=False)
    peft_type = str(adapter_config.get("peft_type", "LORA")).upper()
    if peft_type in PROMPT_LEARNING_PEFT_TYPES:
        raise ExportError(
            f"{run.adapter}: a {peft_type.lower()} adapter adds virtual tokens at run time and cannot be merged into "
            f"weights; ship the adapter instead: lora-tune push {run.root} ORG/NAME"
        )
    return run, recipe, peft_type


def _streaming_plan(run: RunDir, recipe: Recipe, peft_type: str, from_dequantized: bool) -> Any:
    """The adapter as the streaming merge reads it (None for adapter types it does not take)."""
    plan = read_adapter(run.adapter) if peft_type == "LORA" else None
    streaming = plan is not None and not plan.unsupported
    if from_dequantized and not streaming:
        raise ExportOptionError("from_dequantized", "needs a LoRA adapter that the streaming merge handles")
    if from_dequantized and recipe.quantization.bits != 4:
        raise ExportOptionError(
            "from_dequantized", f"the run's base was not 4-bit (quantization.bits: {recipe.quantization.bits})"
        )
    return plan


def _memory_plan(
    run: RunDir, base_dir: Path, layout: Any, plan: Any, torch_dtype: Any, verify: bool, from_dequantized: bool
) -> Any:
    """What the merge and its verification will hold at their peak, from the headers (see memory.py)."""
    streaming = plan is not None and not plan.unsupported
    check = "" if not verify else "layerwise" if streaming and not from_dequantized else "whole"
    weights = run.adapter / "adapter_model.safetensors"
    adapter_bytes = weights.stat().st_size if weights.is_file() else 0
    return plan_memory(base_dir, layout, adapter_bytes, torch_dtype.itemsize, streaming=streaming, verify=check)


def _merged_weights(
    run: RunDir,
    recipe: Recipe,
    base_dir: Path,
    layout: Any,
    plan: Any,
    peft_type: str,
    build: Path,
    torch_dtype: Any,
    from_dequantized: bool,
) -> MergeResult:
    """Write the merged weights into `build`: streaming, tensor by tensor, where the adapter allows; else peft's
    merge_and_unload() on the whole model, said in a warning because of its memory."""
    if plan is not None and not plan.unsupported:
        prepare = nf4_round_trip(recipe, base_dir) if from_dequantized else None
        try:
            return stream_merge(base_dir, layout, plan, build, torch_dtype, recipe, prepare=prepare)
        except NeedsPeftMerge as exc:
            if from_dequantized:
                raise ExportOptionError(
                    "from_dequantized", f"{exc}; the streaming merge cannot take this adapter"
                ) from None
            log.warning(
                "merge: %s; using peft's merge_and_unload(), which holds the whole model in float32 memory, "
                "and fills rows the adapter does not carry as a seeded resize_token_embeddings() does",
                exc,
            )
            return peft_merge(base_dir, run.adapter, build, torch_dtype, recipe)
    reason = f"{peft_type} adapter" if plan is None else ", ".join(plan.unsupported)
    log.warning(
        "merge: %s has no streaming merge; using peft's merge_and_unload(), which holds the whole model "
        "in float32 memory",
        reason,
    )
    return peft_merge(base_dir, run.adapter, build, torch_dtype, recipe)


def _copy_lineage(run: RunDir, build: Path) -> None:
    """A later run that starts from this merged model reads where it came from (sequential fine-tuning)."""
    lineage = json.loads(run.lineage.read_text(encoding="utf-8")) if run.lineage.is_file() else {}
    (build / LINEAGE_FILE).write_text(json.dumps({**lineage, "run": str(run.root)}, indent=2), encoding="utf-8")


def _check_destination(output: Path, *, overwrite: bool, protected: list[Path]) -> None:
    """The destination is new, empty, or an earlier merge that holds only what the merge wrote (replaced with
    --overwrite); a folder with anything else in it is refused, with or without --overwrite, and nothing deleted."""
    check_overlap(output, protected, "output")
    refuse_foreign(output, MERGED)
    check_build_slot(output.with_name(f".{output.name}.old"), "output")  # where the earlier merge is moved aside
    if output.is_dir() and not is_empty(output) and not overwrite:
        raise ExportOptionError(
            "output", f"'{output}' holds an earlier merge; pass --overwrite to replace it, or choose a new folder"
        )


def merge_lock_path(output: Path) -> Path:
    """The lock of a merge destination, beside it: the destination may not exist yet and is replaced whole."""
    return output.parent / f".{output.name}.merge.lock"


def _is_leftover_name(name: str, destination: str) -> bool:
    """What merges to `destination` that were killed may leave beside it: a build folder `.NAME.merge-XXXXXXXX`
    (mkdtemp's names: a-z, 0-9 and _) or the previous destination moved aside, `.NAME.old`. The names keep other
    destinations' folders (another lock, maybe a live merge) apart; the build marker inside proves them lora-tune's."""
    build = re.fullmatch(rf"\.{re.escape(destination)}{re.escape(BUILD_INFIX)}[a-z0-9_]+", name)
    return build is not None or name == f".{destination}.old"


def check_disk_for_merge(output: Path, needed: int) -> None:
    """Refuse to start a merge that cannot fit, rather than fail on the last shard."""
    probe = output if output.exists() else next(p for p in output.absolute().parents if p.exists())
    free = shutil.disk_usage(probe).free
    needed = int(needed * DISK_MARGIN)
    if free < needed:
        raise ExportOptionError(
            "output",
            f"not enough free disk at '{probe}': the merged model needs about {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free",
        )


def write_shard(path: Path, specs: dict[str, Any], tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
    """One output shard (safetensors, `format: pt` as transformers writes it), tensor by tensor; returns bytes."""
    return write_safetensors(path, specs, tensors)


def stream_merge(
    base_dir: Path,
    layout: dict[str, list[str]],
    plan: AdapterPlan,
    build: Path,
    dtype: torch.dtype,
    recipe: Recipe,
    *,
    prepare: Any = None,
) -> MergeResult:
    """Merge shard by shard with the base's own sharding; writes the index when the base has one."""
    names = [name for shard_names in layout.values() for name in shard_names]
    tied = {k: v for k, v in tied_weights(base_dir, recipe).items() if k not in names and v in names}
    available = names + list(tied)

    weights = match_names([f"{m}.weight" for m in plan.updates], available, "LoRA target")
    targets = {weights[f"{m}.weight"]: u for m, u in plan.updates.items()}
    biases = match_names([f"{m}.bias" for m, u in plan.updates.items() if u.bias is not None], available, "LoRA bias")
    bias_targets = {biases[f"{m}.bias"]: plan.updates[m] for m in plan.updates if f"{m}.bias" in biases}
    replaced = match_names(list(plan.replacements), available, "modules_to_save tensor")
    replacements = {base: plan.replacements[name] for name, base in replaced.items()}

    # A tied output weight (lm_head = embed_tokens) is absent from the files. When the adapter changes either side,
    # peft computes with two different matrices, so the merged model gets its own output weight and is untied.
    touched = set(targets) | set(bias_targets) | set(replacements)
    untied = [target for target, source in tied.items() if target in touched or source in touched]
    shards = {shard: list(layout[shard]) for shard in sorted(layout)}
    aliases = {target: tied[target] for target in untied}
    for target in untied:
        home = next(shard for shard, shard_names in layout.items() if tied[target] in shard_names)
        shards[home].append(target)

    vocab_size = resized_vocab(base_dir, layout, replacements, tied, aliases)

    weight_map: dict[str, str] = {}
    total = 0
    for index, (shard, shard_names) in enumerate(shards.items(), start=1):
        log.info("merge: shard %d/%d %s", index, len(shards), shard)
        reader = ShardReader(base_dir / shard)
        specs = output_specs(reader, shard_names, replacements, dtype, aliases)
        tensors = merged_tensors(
            reader, shard_names, plan, targets, bias_targets, replacements, dtype, prepare=prepare, aliases=aliases
        )
        total += write_shard(build / shard, specs, tensors)
        weight_map.update(dict.fromkeys(shard_names, shard))
    if len(shards) > 1 or (base_dir / INDEX_FILE).is_file():
        write_json_atomic(build / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return MergeResult(
        output=build,
        dtype="",
        method="streaming",
        shards=len(shards),
        lora_modules=len(targets),
        replaced_tensors=len(replacements),
        untied=untied,
        vocab_size=vocab_size,
    )


def tied_weights(base_dir: Path, recipe: Recipe) -> dict[str, str]:
    """Tied parameter names {output: source} of the base architecture, read from a weightless (meta) model.

    Skipped (no transformers import, ~150 MB less peak memory) when config.json says the embeddings are untied.
    """
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("tie_word_embeddings") is False and config.get("text_config", {}).get("tie_word_embeddings") in (
        None,
        False,
    ):
        return {}
    return _meta_model(base_dir, recipe).all_tied_weights_keys


def _meta_model(base_dir: Path, recipe: Recipe) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = recipe.model.trust_remote_code
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust)


def nf4_round_trip(recipe: Recipe, base_dir: Path) -> Any:
    """A `prepare` function that gives each base tensor the values training computed with.

    Linear weights that bitsandbytes quantized in training (every nn.Linear but the output layer and tied ones,
    as transformers chooses) go through quantize_4bit -> dequantize_4bit with the run's settings; every tensor is
    first cast to the dtype the base was loaded in.
    """
    import bitsandbytes.functional as bnbf
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert

    model = _meta_model(base_dir, recipe)
    skip = set(get_keys_to_not_convert(model))
    linear = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in skip]
    names = [name for shard_names in base_layout(base_dir).values() for name in shard_names]
    quantized = set(match_names(linear, names, "quantized weight").values())
    load_dtype = resolve_dtype(recipe.model.dtype)
    quant = recipe.quantization
    log.info(
        "merge: %d weights go through the NF4 round trip (%s, double quant %s)",
        len(quantized),
        quant.quant_type,
        quant.double_quant,
    )

    def prepare(name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(load_dtype)
        if name not in quantized:
            return tensor
        packed, state = bnbf.quantize_4bit(
            tensor, blocksize=64, compress_statistics=quant.double_quant, quant_type=quant.quant_type
        )
        return bnbf.dequantize_4bit(packed, state)

    return prepare


def peft_merge(base_dir: Path, adapter: Path, build: Path, dtype: torch.dtype, recipe: Recipe) -> MergeResult:
    """Fallback for adapter types without a streaming merge: whole model in memory, peft does the arithmetic."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code, use_safetensors=True
    )
    resize_to_adapter(base, adapter)
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    model.to(dtype).save_pretrained(build, max_shard_size="4GB")
    shards = len(list(build.glob("*.safetensors")))
    return MergeResult(
        output=build,
        dtype="",
        method="peft merge_and_unload",
        shards=shards,
        lora_modules=0,
        replaced_tensors=0,
        untied=[],
        vocab_size=model.get_input_embeddings().weight.shape[0],
    )


def finish_config(base_dir: Path, build: Path, dtype_name: str, *, untie: bool, vocab_size: int | None = None) -> None:
    """config.json of the base (or as peft saved it) with the output dtype, no quantization settings, and the
    vocabulary size of the merged embeddings when the adapter resized them."""
    source = build / "config.json" if (build / "config.json").is_file() else base_dir / "config.json"
    config = json.loads(source.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    if untie:
        config["tie_word_embeddings"] = False
    if vocab_size is not None:
        holder = config if "vocab_size" in config or "text_config" not in config else config["text_config"]
        holder["vocab_size"] = vocab_size
    write_json_atomic(build / "config.json", config)
    generation = base_dir / "generation_config.json"
    if generation.is_file() and not (build / "generation_config.json").is_file():
        shutil.copyfile(generation, build / "generation_config.json")


# SentencePiece model files: transformers 5 no longer writes them with a fast tokenizer, so a tokenizer saved with
# the adapter lacks the one its base ships. The merged folder gets it from the base: llama.cpp's GGUF converter reads
# Gemma 2, Phi-3 and other SentencePiece vocabularies only from it.
SENTENCEPIECE_FILES = ("tokenizer.model",)


def copy_tokenizer(adapter: Path, build: Path, recipe: Recipe, base_dir: Path | None = None) -> None:
    """The tokenizer saved with the adapter (the training one, with its chat template), copied byte for byte, plus
    the base's SentencePiece model when the adapter's copy lacks it."""
    files = [p for p in adapter.iterdir() if p.is_file() and p.name not in ADAPTER_FILES]
    if not any(p.name.startswith("tokenizer") for p in files):
        log.warning("merge: no tokenizer saved with the adapter; saving the recipe's tokenizer instead")

        load_tokenizer(recipe.model).save_pretrained(build)
    for path in files:  # copyfile, not copy2: the copy gets the umask's permissions, not the source's
        shutil.copyfile(path, build / path.name)
    for name in SENTENCEPIECE_FILES:
        if base_dir is not None and (base_dir / name).is_file() and not (build / name).exists():
            shutil.copyfile(base_dir / name, build / name)


def write_generation_stops(run: RunDir, build: Path) -> None:
    """generation_config.eos_token_id lists every token the run stops on (`model.stops.generation_stops`: the
    template's end of turn, EOS, the base's own stops and the end-of-turn tokens training taught, from the
    pre-flight report), so the merged model stops where the trained one stops in any tool, even when the base's
    generation config names only its EOS (a base, not instruct, checkpoint; or a run trained with
    preflight.on_failure: warn). The base's own ids keep their order, first."""
    from transformers import AutoTokenizer

    configured, _ = read_generation_stops(build)
    current = configured or []
    stops = generation_stops(AutoTokenizer.from_pretrained(build), configured, trained_stops(run))
    missing = [i for i in stops if i not in current]
    if not missing:
        return
    path = build / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["eos_token_id"] = current + missing
    write_json_atomic(path, config)
    log.info("merge: generation_config.eos_token_id now also lists %s, which the run stops on", missing)


__all__ = ["DTYPES", "MergeResult", "SINGLE_FILE", "merge"]
