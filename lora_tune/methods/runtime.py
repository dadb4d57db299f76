"""The run-time steps that differ between fine-tuning methods, called from `train()` in three places:

`prepare_model` (freeze/wrap before the trainer), `attach` (optimizer, callbacks, initialisations that need the
wrapped model) and `save_artifact` (an adapter folder for peft methods, a whole transformers folder for partial
and full fine-tuning). `parameter_counts` gives the trainable/total figures the summary reports for every method.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.errors import MethodError
from lora_tune.methods.loftq import init_loftq
from lora_tune.methods.peft_config import build_peft_config
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import ADAPTER_DIR, LINEAGE_FILE, MODEL_DIR, RunDir

if TYPE_CHECKING:
    from peft import PeftConfig

log = logging.getLogger(__name__)


def has_adapter(recipe: Recipe) -> bool:
    return recipe.adapter.method not in ("partial", "full")


def artifact_name(recipe: Recipe) -> str:
    """The run's saved artefact: `adapter/` (peft) or `model/` (a standard transformers folder)."""
    return ADAPTER_DIR if has_adapter(recipe) else MODEL_DIR


def prepare_model(recipe: Recipe, model: Any, *, task_type: str = "CAUSAL_LM") -> tuple[Any, PeftConfig | None]:
    """Freeze or wrap the base: returns the model to train and the peft config the trainer should apply (or None
    when the model is already what is trained)."""
    a = recipe.adapter
    if a.init_from is not None:
        from peft import PeftModel

        source = resolve_adapter_dir(a.init_from)
        model = PeftModel.from_pretrained(model, source, is_trainable=True)
        _check_same_method(recipe, model)
        return model, None
    if a.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
    if a.method == "partial":
        _freeze_all_but(model, a.last_n_layers, list(a.modules))
        return model, None
    tokenizer = recipe.model.tokenizer or recipe.model.name
    config = build_peft_config(
        a,
        task_type=task_type,  # type: ignore[arg-type]
        total_steps=recipe.training.max_steps,
        tokenizer=tokenizer,
    )
    return model, config


def attach(recipe: Recipe, trainer: Any, run: RunDir) -> None:
    """What needs the trainer's (wrapped) model: LoftQ/PiSSA bookkeeping, the LoRA+ optimizer, AdaLoRA's callback."""
    a = recipe.adapter
    model = trainer.model
    if a.init == "loftq" and a.init_from is None:
        init_loftq(model, recipe.model)
    if a.init in ("pissa", "olora") and a.init_from is None:
        # The initial adapter, saved as peft asks, so the trained one can be saved as a plain LoRA on the original
        # (unmodified) base weights.
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(run.pissa_init)
        model.peft_config["default"].init_lora_weights = a.init
    if a.loraplus_lr_ratio is not None:
        trainer.optimizer = _loraplus_optimizer(trainer, a.loraplus_lr_ratio)
    if a.method == "adalora" or _peft_type(model) == "ADALORA":
        trainer.add_callback(_adalora_callback())


def save_artifact(recipe: Recipe, trainer: Any, tokenizer: Any, build: Path, run: RunDir) -> None:
    """Write the trained artefact into `build` (renamed into place by the caller)."""
    model = trainer.model
    init_dir = run.pissa_init
    # Only the trained adapter: a preference run continuing an earlier adapter also holds TRL's frozen "ref" copy.
    only_trained = {"selected_adapters": ["default"]} if len(getattr(model, "peft_config", {})) > 1 else {}
    if has_adapter(recipe) and init_dir.is_dir():
        model.save_pretrained(build, path_initial_model_for_weight_conversion=str(init_dir), **only_trained)
    else:
        model.save_pretrained(build, **only_trained)
    tokenizer.save_pretrained(build)


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts its unpacked size, as peft's own report does."""
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        state = getattr(p, "quant_state", None)
        n = int(state.shape.numel()) if state is not None and hasattr(state, "shape") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def lineage(recipe: Recipe) -> dict[str, Any]:
    """Where this run starts from: the base, and any earlier lora-tune run it continues (adapter or merged model)."""
    parents: list[dict[str, Any]] = []
    base = Path(recipe.model.name)
    merged = _read_json(base / LINEAGE_FILE) if base.is_dir() else None
    if merged is not None:
        parents.append({"kind": "merged model", "path": str(base), "lineage": merged})
    if recipe.adapter.init_from is not None:
        adapter = resolve_adapter_dir(recipe.adapter.init_from)
        parent_run = adapter.parent
        parents.append(
            {"kind": "adapter", "path": str(adapter), "lineage": _read_json(RunDir(parent_run).lineage) or {}}
        )
    return {"base_model": recipe.model.name, "method": recipe.adapter.method, "parents": parents}


def lineage_chain(data: dict[str, Any]) -> list[str]:
    """The ancestry as lines, oldest first: what a model card prints."""
    lines: list[str] = []
    for parent in data.get("parents", []):
        lines.extend(lineage_chain(parent.get("lineage") or {}))
        lines.append(f"{parent['kind']}: {parent['path']}")
    return lines


def resolve_adapter_dir(path: str) -> Path:
    """A run directory (its adapter/) or an adapter folder itself."""
    root = Path(path)
    for candidate in (RunDir(root).adapter, root):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise MethodError(f"adapter.init_from: '{path}' holds no adapter (expected adapter_config.json in it or adapter/)")


def _check_same_method(recipe: Recipe, model: Any) -> None:
    found = _peft_type(model).lower()
    if found != recipe.adapter.method:
        raise MethodError(
            f"adapter.method: is {recipe.adapter.method} but init_from holds a {found} adapter; set method: {found}"
        )


def _peft_type(model: Any) -> str:
    config = getattr(model, "peft_config", {}).get("default")
    return str(getattr(getattr(config, "peft_type", None), "value", "")) if config is not None else ""


def _freeze_all_but(model: Any, last_n_layers: int, modules: list[str]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    if last_n_layers:
        blocks = _blocks(model)
        if last_n_layers > len(blocks):
            raise MethodError(f"adapter.last_n_layers: {last_n_layers} but the model has {len(blocks)} blocks")
        for block in list(blocks)[-last_n_layers:]:
            block.requires_grad_(True)
    for wanted in modules:
        matched = [m for name, m in model.named_modules() if name == wanted or name.endswith("." + wanted)]
        if not matched:
            raise MethodError(f"adapter.modules: no module named '{wanted}' in {type(model).__name__}")
        for module in matched:
            module.requires_grad_(True)


def _blocks(model: Any) -> Any:
    """The transformer blocks: the ModuleList holding most parameters (model.layers, transformer.h, ...)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise MethodError(f"adapter.last_n_layers: no list of transformer blocks found in {type(model).__name__}")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _loraplus_optimizer(trainer: Any, ratio: float) -> Any:
    from peft.optimizers import create_loraplus_optimizer

    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", trainer.args.learning_rate)
    return create_loraplus_optimizer(
        trainer.model,
        optimizer_cls,
        lr=lr,
        loraplus_lr_ratio=ratio,
        weight_decay=trainer.args.weight_decay,
        **kwargs,
    )


def _adalora_callback() -> Any:
    from transformers import TrainerCallback

    class AdaLoraBudget(TrainerCallback):
        """AdaLoRA reallocates its rank budget after each optimizer step, while the gradients are still there."""

        def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            inner = getattr(model, "base_model", None)
            if inner is not None and hasattr(inner, "update_and_allocate"):
                inner.update_and_allocate(state.global_step)

    return AdaLoraBudget()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
