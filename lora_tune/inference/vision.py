"""A vision run (or a merged vision folder) used: its processor, the base with the adapter, answers to images.

The prompt is rendered by the processor's chat template exactly as training rendered it (one image part per image,
the generation prompt after the last user turn), the images turned into pixels by the processor's own rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from lora_tune.data.sources import Origin
from lora_tune.data.vision import image_cell, open_image
from lora_tune.inference.load import LoadedModel, run_artifact
from lora_tune.model.vision import load_processor, load_vision_model
from lora_tune.model.weights import check_adapter_folder, check_model_folder
from lora_tune.recipe.load import load_recipe
from lora_tune.recipe.schema import EvalConfig, ModelConfig, QuantizationConfig
from lora_tune.run.layout import RunDir


def is_vision_folder(path: str | Path) -> bool:
    """A run whose recipe has `vision:`, or a model folder with an image processor."""
    root = Path(path)
    run = RunDir(root)
    if run.is_run():
        return load_recipe(run.recipe, check_paths=False).vision is not None
    return (root / "preprocessor_config.json").is_file() or (root / "processor_config.json").is_file()


def load_vision_run(path: str | Path) -> tuple[Any, Any, Any]:
    """(model, processor, eval settings) of a vision run (base + adapter, quantized as in training) or a merged
    folder."""
    root = Path(path)
    run = RunDir(root)
    if not run.is_run():
        check_model_folder(root)
        model_cfg = ModelConfig(name=str(root))
        model = load_vision_model(model_cfg, QuantizationConfig(), gradient_checkpointing=False, inference=True)
        model.eval()
        return model, load_processor(model_cfg), EvalConfig()
    artifact = run_artifact(run)
    check_adapter_folder(artifact)
    recipe = load_recipe(run.recipe, check_paths=False)
    from peft import PeftModel

    base = load_vision_model(recipe.model, recipe.quantization, gradient_checkpointing=False, inference=True)
    model = PeftModel.from_pretrained(base, artifact)
    model.eval()
    processor = load_processor(recipe.model.model_copy(update={"tokenizer": str(artifact), "chat_template": None}))
    return model, processor, recipe.eval


def answer(
    model: Any, processor: Any, messages: Sequence[Mapping[str, Any]], images: Sequence[Any], settings: Any
) -> str:
    """The model's reply to `messages` (image parts bare, `images` their {"path", "bytes"} cells or PIL images)."""
    import torch

    pictures = [open_image(i) if isinstance(i, Mapping) else i for i in images]
    text = processor.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    inputs = processor(
        text=[text], images=[pictures] if pictures else None, add_special_tokens=False, return_tensors="pt"
    )
    tokenizer = processor.tokenizer
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample}
    if settings.do_sample:
        kwargs |= {"temperature": settings.temperature, "top_p": settings.top_p}
    eos = tokenizer.eos_token_id if settings.stop_on_eos else None
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def image_prompt(text: str, image_paths: Sequence[str]) -> tuple[list[dict[str, Any]], list[Any]]:
    """One user turn: an image part per `--image`, then the text; the images as cells (opened when answered)."""
    where = Origin("--image", 1)
    cells = [image_cell(str(Path(p).resolve()), where, Path.cwd(), k) for k, p in enumerate(image_paths)]
    for k, cell in enumerate(cells):
        open_image(cell, where, k)
    parts = [{"type": "image"} for _ in cells] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}], cells


def load_vision_for_inference(path: str | Path) -> Any:
    """A vision run or merged folder as `generate` and `chat` take it (its processor in the tokenizer's place)."""
    model, processor, settings = load_vision_run(path)
    return LoadedModel(model, processor, settings, f"{path} (vision-language)")


def generate_with_images(loaded: Any, prompt: str, image_paths: Sequence[str], *, system: str | None = None) -> str:
    """`lora-tune generate RUN PROMPT --image PATH`: one answer to the prompt with its images."""
    messages, cells = image_prompt(prompt, image_paths)
    if system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return answer(loaded.model, loaded.tokenizer, messages, cells, loaded.settings)


def vision_chat_loop(
    loaded: Any, image_paths: Sequence[str], *, system: str | None = None, stdin: IO[str], stdout: IO[str]
) -> list[dict[str, Any]]:
    """`lora-tune chat RUN --image PATH`: the images go with the first user turn; /reset starts over, /exit quits."""
    history: list[dict[str, Any]] = []
    cells: list[Any] = []
    stdout.write(f"Chatting with {loaded.description}; images: {', '.join(image_paths) or 'none'}. /exit quits.\n")
    while True:
        stdout.write("you> " if stdin.isatty() else "")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return history
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history, cells = [], []
            continue
        if not history:
            history, cells = image_prompt(text, image_paths)
            if system:
                history.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        else:
            history.append({"role": "user", "content": [{"type": "text", "text": text}]})
        reply = answer(loaded.model, loaded.tokenizer, history, cells, loaded.settings)
        history.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        stdout.write(f"model> {reply}\n")
