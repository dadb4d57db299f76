"""Which adapter keys each method reads, and the method combinations that cannot work, refused at validation.

Imports no ML library: `lora-tune validate` runs these rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lora_tune.errors import FieldError

if TYPE_CHECKING:
    from lora_tune.recipe.schema import AdapterConfig, Recipe


Method = Literal[
    "lora", "ia3", "adalora", "loha", "lokr", "prompt_tuning", "prefix_tuning", "p_tuning", "partial", "full"
]


LORA_KEYS = {
    "r", "alpha", "dropout", "target_modules", "bias", "use_dora", "use_rslora", "modules_to_save", "init",
    "loraplus_lr_ratio", "rank_pattern", "alpha_pattern", "init_from",
}  # fmt: skip
# The adapter keys each method reads; a key set in a recipe that its method does not read is refused.
METHOD_KEYS: dict[str, set[str]] = {
    "lora": LORA_KEYS,
    "ia3": {"target_modules", "feedforward_modules", "modules_to_save", "init_from"},
    "adalora": {
        "r",
        "target_r",
        "alpha",
        "dropout",
        "target_modules",
        "modules_to_save",
        "tinit",
        "tfinal",
        "delta_t",
        "init_from",
    },  # fmt: skip
    "loha": {"r", "alpha", "target_modules", "modules_to_save", "init_from"},
    "lokr": {"r", "alpha", "target_modules", "modules_to_save", "init_from"},
    "prompt_tuning": {"num_virtual_tokens", "prompt_init_text", "init_from"},
    "prefix_tuning": {"num_virtual_tokens", "init_from"},
    "p_tuning": {"num_virtual_tokens", "encoder_hidden_size", "init_from"},
    "partial": {"last_n_layers", "modules"},
    "full": set(),
}
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")
Objective = Literal["sft", "dpo", "orpo", "kto", "simpo", "grpo", "rloo"]
PAIRWISE = ("loss", "rewards/accuracies", "rewards/margins")  # what TRL's pairwise trainers log at evaluation
RL_METRICS = ("reward", "loss")  # what TRL's online trainers log at evaluation: the mean total reward first
# The `rl:` keys both online objectives read; each adds its own (OBJECTIVES).
RL_SHARED = frozenset({
    "num_generations", "max_completion_length", "temperature", "top_p", "beta", "steps_per_generation",
    "rewards", "use_vllm", "vllm_mode", "log_completions",
})  # fmt: skip


@dataclass(frozen=True)
class ObjectiveNeeds:
    """What one training objective needs and reads. `OBJECTIVES` is the one table: validation, the trainer
    arguments, the data reader, the pre-flight, the planner and `lora-tune new` all look objectives up there."""

    task: str  # the task folder that trains it (lora_tune/tasks/<task>/): sft, preference or rl
    rows: str  # the rows it reads: "chat" (SFT's formats), "preference" (prompt/chosen/rejected), "kto" or "prompts"
    answers: tuple[str, ...]  # a row's answer columns, beside its prompt
    preference_keys: frozenset[str]  # the `preference:` keys it reads; the others are refused
    best_metrics: tuple[str, ...]  # the validation metrics its trainer logs, which training.best_metric may name
    reference: bool  # a reference policy computes log-probs (the adapter switched off), unless precomputed
    default_beta: float | None  # preference.beta when the recipe sets none: the paper's and TRL's default
    activation_offloading: bool  # its trainer honours training.activation_offloading
    rl_keys: frozenset[str] = frozenset()  # the `rl:` keys it reads (online RL); the others are refused


OBJECTIVES: dict[str, ObjectiveNeeds] = {
    "sft": ObjectiveNeeds("sft", "chat", (), frozenset(), ("loss", "mean_token_accuracy"), False, None, True),
    "dpo": ObjectiveNeeds(
        "preference",
        "preference",
        ("chosen", "rejected"),
        frozenset({"beta", "loss_type", "label_smoothing", "precompute_ref_log_probs"}),
        PAIRWISE,
        True,
        0.1,
        True,
    ),
    "orpo": ObjectiveNeeds(
        "preference", "preference", ("chosen", "rejected"), frozenset({"beta"}), PAIRWISE, False, 0.1, False
    ),
    "kto": ObjectiveNeeds(
        "preference",
        "kto",
        ("completion", "label"),
        frozenset({"beta", "desirable_weight", "undesirable_weight", "precompute_ref_log_probs"}),
        ("loss",),  # KTO logs no pairwise accuracy
        True,
        0.1,
        True,
    ),
    "simpo": ObjectiveNeeds(
        "preference",
        "preference",
        ("chosen", "rejected"),
        frozenset({"beta", "simpo_gamma", "label_smoothing"}),
        PAIRWISE,
        False,
        2.0,
        False,  # TRL's CPO trainer, which runs SimPO
    ),
    # Online RL: the policy samples num_generations completions per prompt and reward functions score them.
    "grpo": ObjectiveNeeds(
        "rl", "prompts", (), frozenset(), RL_METRICS, False, 0.0, False, RL_SHARED | {"loss_type", "scale_rewards"}
    ),
    "rloo": ObjectiveNeeds(
        "rl", "prompts", (), frozenset(), RL_METRICS, False, 0.05, False, RL_SHARED | {"normalize_advantages"}
    ),
}
PREFERENCE_OBJECTIVES = tuple(name for name, needs in OBJECTIVES.items() if needs.task == "preference")
RL_OBJECTIVES = tuple(name for name, needs in OBJECTIVES.items() if needs.task == "rl")
# What a classification run logs at evaluation: its loss, and the head's accuracy (tasks/classification).
CLASSIFICATION_METRICS = ("loss", "accuracy")

# Settings only some runs honour, by run kind (Recipe.run_kind: "classification", or the training objective): the
# others' trainers would ignore them without a word, so validate refuses them there, naming the key and the run, and
# the resolved recipe leaves them out. A key names a field, or a whole section.
HONOURED_BY: dict[str, frozenset[str]] = {
    "training.packing": frozenset({"sft"}),  # the SFT data pipeline packs
    "training.train_on": frozenset({"sft"}),  # SFT's loss masking
    "training.liger": frozenset({"sft"}),  # applied to the SFT model (tasks/sft)
    "training.activation_offloading": frozenset(k for k, n in OBJECTIVES.items() if n.activation_offloading),
    "distributed": frozenset({"sft"}),  # only SFT runs in several processes (tasks/<task>/training.py)
    "rl": frozenset(RL_OBJECTIVES),
}


def honours(run_kind: str, key: str) -> bool:
    """Whether a run of this kind honours the setting `key` (HONOURED_BY; keys it does not list, every run does)."""
    return key not in HONOURED_BY or run_kind in HONOURED_BY[key]


def best_metrics(run_kind: str) -> tuple[str, ...]:
    """The validation metrics a run of this kind logs."""
    return CLASSIFICATION_METRICS if run_kind == "classification" else OBJECTIVES[run_kind].best_metrics


# Keys that still apply when an earlier run's adapter (and its saved settings) is continued.
CONTINUE_KEYS = {"method", "init_from", "loraplus_lr_ratio"}

# peft wraps bitsandbytes layers for these methods only (its dispatchers: lora/ia3/adalora have bnb.py; LoHa and
# LoKr map nn.Linear alone and would treat the packed 4-bit weight as a dense matrix).
QUANTIZABLE = {"lora", "ia3", "adalora", *PROMPT_LEARNING}


def check_adapter(cfg: AdapterConfig) -> None:
    """Keys the method does not read are refused, so a recipe never carries a setting that silently does nothing."""
    allowed = METHOD_KEYS[cfg.method]
    foreign = sorted(cfg.model_fields_set - allowed - {"method"})
    if foreign:
        keys = ", ".join(sorted(allowed)) or "none besides method"
        raise FieldError(foreign[0], f"does not apply to method {cfg.method} (its keys: {keys})")
    if cfg.init_from is not None:
        fixed = sorted(cfg.model_fields_set - CONTINUE_KEYS)
        if fixed:
            raise FieldError(fixed[0], "cannot change when init_from continues an earlier adapter (its settings stay)")
    if cfg.method == "partial" and cfg.last_n_layers == 0 and not cfg.modules:
        raise FieldError("last_n_layers", "partial fine-tuning trains nothing: set last_n_layers > 0 and/or modules")
    if cfg.method == "ia3" and cfg.feedforward_modules and isinstance(cfg.target_modules, list):
        outside = sorted(set(cfg.feedforward_modules) - set(cfg.target_modules))
        if outside:
            raise FieldError("feedforward_modules", f"{outside[0]} is not in target_modules")
    if cfg.init in ("pissa", "olora") and cfg.use_rslora and (cfg.rank_pattern or cfg.alpha_pattern):
        # peft cannot convert such an adapter back to plain LoRA at save time.
        raise FieldError("init", f"{cfg.init} with use_rslora and rank/alpha patterns cannot be saved as plain LoRA")
    if cfg.method == "adalora" and cfg.target_r > cfg.r:
        raise FieldError("target_r", f"({cfg.target_r}) must not exceed the initial rank r ({cfg.r})")


def check_recipe(recipe: Recipe) -> None:
    """Cross-section rules: method x quantization, method x task. (Packing, on by default, turns itself off for the
    methods it would break: `lora_tune.data.packing.packing_plan`.)"""
    method, bits = recipe.adapter.method, recipe.quantization.bits
    if bits is not None and method not in QUANTIZABLE:
        why = {
            "full": "full fine-tuning trains every weight, and quantized weights cannot be trained",
            "partial": "partial fine-tuning trains base weights, and quantized weights cannot be trained",
        }.get(method, f"peft has no {bits}-bit (bitsandbytes) layer for {method}")
        raise FieldError("quantization.bits", f"{bits} cannot be used with adapter.method {method}: {why}")
    _check_init(recipe)
    if method == "prefix_tuning" and recipe.training.gradient_checkpointing:
        # Measured: checkpointed layers recompute attention without the prefix cache (shape mismatch in backward).
        raise FieldError(
            "training.gradient_checkpointing", "cannot be used with prefix_tuning; set gradient_checkpointing: false"
        )
    if method == "adalora":
        _check_adalora(recipe)
    if recipe.task.type == "classification":
        if method in PROMPT_LEARNING:
            raise FieldError("adapter.method", f"{method} is not offered for classification; use lora, ia3 or full")


def _check_init(recipe: Recipe) -> None:
    init, bits = recipe.adapter.init, recipe.quantization.bits
    if init in ("pissa", "olora") and bits is not None:
        raise FieldError(
            "adapter.init",
            f"{init} rewrites the base weights and needs an unquantized base (quantization.bits: null); "
            "for a 4-bit base use init: loftq",
        )
    if init == "loftq" and bits != 4:
        raise FieldError("adapter.init", "loftq fits LoRA to the 4-bit quantization error: set quantization.bits: 4")


def _check_adalora(recipe: Recipe) -> None:
    a, steps = recipe.adapter, recipe.training.max_steps
    if steps is None:
        raise FieldError("training.max_steps", "AdaLoRA schedules its rank budget over a known step count: set it")
    if a.tinit + a.tfinal >= steps:
        raise FieldError(
            "adapter.tinit", f"tinit + tfinal ({a.tinit} + {a.tfinal}) must be below training.max_steps ({steps})"
        )


def check_objective(recipe: Recipe) -> None:
    """The preference and RL settings belong to the objective; the data and task fit it; the run honours every
    setting."""
    objective = recipe.training.objective
    needs = OBJECTIVES[objective]
    _check_best_metric(recipe.run_kind, recipe.training.best_metric)
    _check_section_keys("preference", recipe.preference.model_fields_set, needs.preference_keys, objective)
    _check_section_keys("rl", recipe.rl.model_fields_set, needs.rl_keys, objective)
    check_honoured(recipe)
    if objective == "sft":
        foreign = [d.format for d in recipe.datasets if d.format in OBJECTIVE_FORMATS]
        if foreign:
            kind = "an rl (grpo, rloo)" if foreign[0] == "prompts" else "a preference"
            raise FieldError("datasets", f"format {foreign[0]} needs {kind} training.objective")
        return
    if recipe.task.type != "sft":
        raise FieldError("training.objective", f"{objective} trains a causal LM; task.type must be sft")
    if needs.task == "rl":
        _check_rl_batch(recipe)
    readable = ("auto", needs.rows, *(CHAT_FORMATS if needs.task == "rl" else ()))
    for source in (*recipe.datasets, *recipe.eval_datasets, *recipe.test_datasets):
        if source.format not in readable:
            raise FieldError(
                "datasets", f"'{source.path}': {objective} reads {needs.rows} rows, not format {source.format}"
            )


# Formats only some objectives read; the chat formats an RL run also reads (the last answer is the reference).
OBJECTIVE_FORMATS = ("preference", "kto", "prompts")
CHAT_FORMATS = ("messages", "alpaca", "sharegpt", "prompt_completion")


def _check_rl_batch(recipe: Recipe) -> None:
    """TRL's online trainers compare the completions of one prompt within a batch of generations: the batch
    (training.batch_size completions x steps per generation) holds whole groups of num_generations, and so does the
    evaluation batch."""
    t, rl = recipe.training, recipe.rl
    steps = rl.steps_per_generation or t.gradient_accumulation_steps
    if (t.batch_size * steps) % rl.num_generations:
        raise FieldError(
            "training.batch_size",
            f"{t.batch_size} completions x {steps} steps per generation is not a multiple of rl.num_generations "
            f"({rl.num_generations}): a batch holds whole groups; e.g. batch_size: {rl.num_generations}",
        )
    eval_batch = t.eval_batch_size or t.batch_size
    if t.eval_strategy != "no" and eval_batch % rl.num_generations:
        raise FieldError(
            "training.eval_batch_size",
            f"{eval_batch} is not a multiple of rl.num_generations ({rl.num_generations}): evaluation samples whole "
            "groups too",
        )


def _check_section_keys(section: str, given: set[str], reads: frozenset[str], objective: str) -> None:
    foreign = sorted(given - reads)
    if foreign:
        readers = [name for name, needs in OBJECTIVES.items() if foreign[0] in getattr(needs, f"{section}_keys")]
        said = f"it reads {', '.join(sorted(reads))}" if reads else f"set training.objective: {' or '.join(readers)}"
        raise FieldError(f"{section}.{foreign[0]}", f"is not read by training.objective {objective}; {said}")


def check_honoured(recipe: Recipe) -> None:
    """A setting the run would ignore (HONOURED_BY) is refused, naming the key and the run."""
    kind = recipe.run_kind
    for key, kinds in HONOURED_BY.items():
        if kind not in kinds and _is_set(recipe, key):
            runs = ", ".join(sorted(kinds))
            raise FieldError(key, f"is not honoured by {_describe(kind)} runs (only by {runs}); remove it")


def _is_set(recipe: Recipe, key: str) -> bool:
    section, _, name = key.partition(".")
    if section not in recipe.model_fields_set:
        return False
    return not name or name in getattr(recipe, section).model_fields_set


def _describe(kind: str) -> str:
    return "classification" if kind == "classification" else f"training.objective {kind}"


def _check_best_metric(kind: str, metric: str) -> None:
    """The metric must be one the run's trainer logs at evaluation (KTO logs no pairwise accuracy)."""
    logged = best_metrics(kind)
    if metric not in logged:
        raise FieldError(
            "training.best_metric", f"{_describe(kind)} logs {', '.join(logged)} at evaluation, not {metric}"
        )
