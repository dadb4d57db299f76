"""Loading a model to use it: a run directory (the base as in training with the adapter on it, or the saved `model/`),
or a merged model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.data.masking import record_thinking, recorded_thinking
from lora_tune.errors import LoraTuneError
from lora_tune.model.chat_template import ensure_pad_token
from lora_tune.model.load import load_model, load_tokenizer, resolve_dtype
from lora_tune.model.safety import check_weights_format
from lora_tune.model.weights import check_adapter_folder, check_model_folder
from lora_tune.recipe.load import load_recipe
from lora_tune.recipe.schema import EvalConfig
from lora_tune.run.layout import LABELS_FILE, MODEL_DIR, RunDir

if TYPE_CHECKING:
    from lora_tune.recipe.schema import EvalConfig


class ModelFolderError(LoraTuneError):
    """The path is neither a lora-tune run nor a model folder."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    settings: EvalConfig  # the run's recipe `eval:` section; the defaults for a merged folder
    description: str

    @property
    def thinking(self) -> bool | None:
        """The enable_thinking prompts render with (`model.chat_template.generation_prompt`): the run's, recorded in
        the tokenizer saved with it; None where nothing is recorded (the template's own default)."""
        return recorded_thinking(self.tokenizer)


def run_artifact(run: RunDir) -> Path:
    """The run's trained artefact: `adapter/` (a peft adapter) or `model/` (partial or full fine-tuning)."""
    if run.is_run():
        if (run.adapter / "adapter_config.json").is_file():
            return run.adapter
        if (run.model / "config.json").is_file():
            return run.model
    raise ModelFolderError(f"{run.root}: not a finished lora-tune run (no recipe.yaml, or no adapter/ nor model/)")


def load_base_model(recipe: Any) -> Any:
    """The recipe's base model, loaded (and quantized) as in training, in eval mode, for inference only (4-bit layers
    may compute in bfloat16 on an AVX512-BF16 CPU: the load logs it)."""
    local = Path(recipe.model.name).expanduser()
    if local.is_dir():  # a hub id is fetched and checked by transformers; a local folder may be broken
        check_model_folder(local)
    training = recipe.training.model_copy(update={"gradient_checkpointing": False})
    model = load_model(recipe.model, recipe.quantization, training, inference=True)
    model.eval()
    return model


def load_run_model(run: RunDir) -> tuple[Any, Any]:
    """The tuned model and the tokenizer saved with it: the base (quantized as in training) with the adapter on it,
    or the saved `model/` folder of a partial or full fine-tuning run (safetensors only)."""
    artifact = run_artifact(run)
    # A broken file of the run is named here, before the base model's weights are loaded (minutes, for a big one).
    if artifact == run.adapter:
        check_adapter_folder(artifact)
    else:
        check_model_folder(artifact)
    recipe = load_recipe(run.recipe, check_paths=False)
    if (artifact / LABELS_FILE).is_file():  # a classification head's label names: see lora_tune.tasks
        raise ModelFolderError(
            f"{run.root}: a classification-head run predicts labels, it does not generate; "
            "score it with `lora-tune eval`"
        )
    # The tokenizer saved with the artefact is the one the training examples were built with; it records the
    # enable_thinking training chose (data.thinking). A run whose data did not record it (a preference run) gets the
    # recipe's on or off; auto then leaves the template's default.
    tokenizer = load_tokenizer(recipe.model.model_copy(update={"tokenizer": str(artifact), "chat_template": None}))
    if recorded_thinking(tokenizer) is None and recipe.data.thinking != "auto":
        record_thinking(tokenizer, recipe.data.thinking == "on")
    if artifact.name == MODEL_DIR:
        return load_model_folder(artifact, recipe.model.dtype), tokenizer
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_model(recipe), artifact)
    model.eval()
    return model, tokenizer


def load_model_folder(folder: Path, dtype: str = "auto", auto_class: str = "AutoModelForCausalLM") -> Any:
    """A transformers folder lora-tune wrote, from its safetensors weights only (pickle weights are refused)."""
    import transformers

    check_weights_format(str(folder), "run model", allow_pickle=False, key=str(folder))
    loader = getattr(transformers, auto_class)
    model = loader.from_pretrained(folder, dtype=resolve_dtype(dtype), use_safetensors=True)
    model.eval()
    return model


def load_for_inference(path: str | Path) -> LoadedModel:
    """A run directory (adapter on its base) or a merged model folder (config.json + weights + tokenizer)."""
    root = Path(path)
    run = RunDir(root)
    if run.is_run():
        model, tokenizer = load_run_model(run)
        settings = load_recipe(run.recipe, check_paths=False).eval
        what = "adapter on its base" if run_artifact(run) == run.adapter else "fine-tuned model"
        return LoadedModel(model, tokenizer, settings, f"{root} ({what})")
    if not (root / "config.json").is_file():
        raise ModelFolderError(
            f"{root}: neither a lora-tune run (recipe.yaml) nor a model folder (config.json); "
            "pass a run directory or a folder written by `lora-tune merge`"
        )
    check_model_folder(root)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root)
    ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(root, dtype="auto")
    model.eval()
    return LoadedModel(model, tokenizer, EvalConfig(), f"{root} (merged model)")
