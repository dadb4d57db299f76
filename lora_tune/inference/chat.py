"""Trying a model: one answer (`lora-tune generate`) or a multi-turn chat (`lora-tune chat`), streamed token by token.

Either a run directory (the base loaded as in training, 4-bit when the recipe quantizes, with the adapter on it) or a
merged model folder (as `lora-tune merge` writes it: a plain transformers model with its tokenizer). The prompt is
rendered with the tokenizer's chat template, the one the adapter was trained with.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lora_tune.errors import LoraTuneError
from lora_tune.run.layout import MODEL_DIR, RunDir

if TYPE_CHECKING:
    from lora_tune.recipe.schema import EvalConfig

EXIT_COMMANDS = {"/exit", "/quit"}
RESET_COMMAND = "/reset"


class ModelFolderError(LoraTuneError):
    """The path is neither a lora-tune run nor a model folder."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    settings: EvalConfig  # the run's recipe `eval:` section; the defaults for a merged folder
    description: str


def run_artifact(run: RunDir) -> Path:
    """The run's trained artefact: `adapter/` (a peft adapter) or `model/` (partial or full fine-tuning)."""
    if run.is_run():
        if (run.adapter / "adapter_config.json").is_file():
            return run.adapter
        if (run.root / MODEL_DIR / "config.json").is_file():
            return run.root / MODEL_DIR
    raise ModelFolderError(f"{run.root}: not a finished lora-tune run (no recipe.yaml, or no adapter/ nor model/)")


def load_base_model(recipe: Any) -> Any:
    """The recipe's base model, loaded (and quantized) as in training, in eval mode, for inference only (4-bit layers
    may compute in bfloat16 on an AVX512-BF16 CPU: the load logs it)."""
    from lora_tune.model.load import load_model

    training = recipe.training.model_copy(update={"gradient_checkpointing": False})
    model = load_model(recipe.model, recipe.quantization, training, inference=True)
    model.eval()
    return model


def load_run_model(run: RunDir) -> tuple[Any, Any]:
    """The tuned model and the tokenizer saved with it: the base (quantized as in training) with the adapter on it,
    or the saved `model/` folder of a partial or full fine-tuning run (safetensors only)."""
    artifact = run_artifact(run)
    from lora_tune.model.load import load_tokenizer
    from lora_tune.recipe.load import load_recipe

    recipe = load_recipe(run.recipe, check_paths=False)
    if recipe.task.type == "classification":
        raise ModelFolderError(
            f"{run.root}: a classification-head run predicts labels, it does not generate; "
            "score it with `lora-tune eval`"
        )
    # The tokenizer saved with the artefact is the one the training examples were built with.
    tokenizer = load_tokenizer(recipe.model.model_copy(update={"tokenizer": str(artifact), "chat_template": None}))
    if artifact.name == MODEL_DIR:
        return load_model_folder(artifact, recipe.model.dtype), tokenizer
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_model(recipe), artifact)
    model.eval()
    return model, tokenizer


def load_model_folder(folder: Path, dtype: str = "auto", auto_class: str = "AutoModelForCausalLM") -> Any:
    """A transformers folder lora-tune wrote, from its safetensors weights only (pickle weights are refused)."""
    import transformers

    from lora_tune.model.load import resolve_dtype
    from lora_tune.model.safety import check_weights_format

    check_weights_format(str(folder), "run model", allow_pickle=False, key=str(folder))
    loader = getattr(transformers, auto_class)
    model = loader.from_pretrained(folder, dtype=resolve_dtype(dtype), use_safetensors=True)
    model.eval()
    return model


def load_for_inference(path: str | Path) -> LoadedModel:
    """A run directory (adapter on its base) or a merged model folder (config.json + weights + tokenizer)."""
    from lora_tune.recipe.schema import EvalConfig

    root = Path(path)
    run = RunDir(root)
    if run.is_run():
        from lora_tune.recipe.load import load_recipe

        model, tokenizer = load_run_model(run)
        settings = load_recipe(run.recipe, check_paths=False).eval
        what = "adapter on its base" if run_artifact(run) == run.adapter else "fine-tuned model"
        return LoadedModel(model, tokenizer, settings, f"{root} ({what})")
    if not (root / "config.json").is_file():
        raise ModelFolderError(
            f"{root}: neither a lora-tune run (recipe.yaml) nor a model folder (config.json); "
            "pass a run directory or a folder written by `lora-tune merge`"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_tune.data.templates import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(root)
    ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(root, dtype="auto")
    model.eval()
    return LoadedModel(model, tokenizer, EvalConfig(), f"{root} (merged model)")


def reply(
    loaded: LoadedModel,
    messages: list[dict[str, str]],
    *,
    stream: IO[str] | None = None,
    settings: EvalConfig | None = None,
) -> str:
    """The model's answer to `messages`; with `stream`, its text is also written there token by token."""
    import torch

    from lora_tune.inference.generate import generation_kwargs, stop_token_ids

    settings = settings or loaded.settings
    tokenizer, model = loaded.tokenizer, loaded.model
    if tokenizer.chat_template is None:
        raise ModelFolderError("the tokenizer has no chat template; set model.chat_template in the recipe and retrain")
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(next(model.parameters()).device)
    streamer = _streamer(tokenizer, stream) if stream is not None else None
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **generation_kwargs(settings, stop_token_ids(model, tokenizer)),
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def _streamer(tokenizer: Any, stream: IO[str]) -> Any:
    """transformers' TextStreamer, writing each finished piece of text to `stream` rather than to print()."""
    from transformers import TextStreamer

    class StreamTo(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return StreamTo(tokenizer, skip_prompt=True, skip_special_tokens=True)


@dataclass
class ChatSession:
    """A multi-turn conversation: the history grows with each exchange; /reset empties it (keeping the system)."""

    loaded: LoadedModel
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def __post_init__(self) -> None:
        self.reset()

    def ask(self, text: str, stream: IO[str] | None = None) -> str:
        self.history.append({"role": "user", "content": text})
        answer = reply(self.loaded, self.history, stream=stream)
        self.history.append({"role": "assistant", "content": answer})
        return answer


def chat_loop(
    loaded: LoadedModel, *, system: str | None = None, stdin: IO[str] | None = None, stdout: IO[str] | None = None
) -> ChatSession:
    """Read user turns line by line from `stdin` until /exit or end of input; stream each answer to `stdout`."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = ChatSession(loaded, system=system)
    interactive = stdin.isatty()
    stdout.write(f"Chatting with {loaded.description}. /reset starts over, /exit quits.\n")
    while True:
        if interactive:
            stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D, or the end of a piped file)
            break
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            session.reset()
            stdout.write("(history cleared)\n")
            continue
        stdout.write("model> ")
        session.ask(text, stream=stdout)
    return session


def with_settings(loaded: LoadedModel, update: dict[str, Any]) -> LoadedModel:
    """`loaded` with some generation settings replaced, validated as the recipe's `eval:` section is."""
    from pydantic import ValidationError

    from lora_tune.recipe.schema import EvalConfig

    if not update:
        return loaded
    try:
        settings = EvalConfig.model_validate({**loaded.settings.model_dump(exclude_unset=True), **update})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ModelFolderError(f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}") from None
    return LoadedModel(loaded.model, loaded.tokenizer, settings, loaded.description)
