"""Typed, frozen recipe objects: the single source of truth of a run.

Every section forbids unknown keys, so a typo is an error rather than a silently ignored setting. Field
descriptions are the documentation of each option (`lora-tune validate --explain` and the table in docs/recipes.md
read them).
This module must not import torch or any training library: `lora-tune validate` runs on it alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from lora_tune.errors import FieldError
from lora_tune.recipe.rules import (
    CONTINUE_KEYS,
    HONOURED_BY,
    METHOD_KEYS,
    OBJECTIVES,
    Method,
    Objective,
    check_adapter,
    check_objective,
    check_recipe,
)
from lora_tune.recipe.strategy import DistributedError, check_distributed_section
from lora_tune.recipe.templates import BUILTIN_TEMPLATES, builtin_template, looks_like_template_name
from lora_tune.run.layout import RunDir

Dtype = Literal["auto", "bfloat16", "float16", "float32"]

MAX_EPOCHS = 10_000  # bounded so that epochs x steps per epoch stays a step count; longer runs set max_steps
MAX_STEPS = 1_000_000_000  # far past any real run; a larger count is a typo or an overflow waiting to happen
MAX_SEED = 2**32 - 1  # numpy's seeds end there: transformers.set_seed would crash with a larger one mid-setup
MAX_WEIGHT = 1_000.0  # a source repeated more than a thousand times is a typo; rows are built in memory


class StrictModel(BaseModel):
    """Base of every recipe section: unknown keys are refused and objects cannot change after validation.

    Every float, in every section and inside its lists and mappings, must be finite: YAML reads `.inf`, `.nan` and
    `1e999` as floats, and one of them as a learning rate or alpha trains an adapter of NaNs without an error.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(StrictModel):
    name: str = Field(description="Base model: a local folder or a hub id such as Qwen/Qwen2.5-0.5B-Instruct.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    tokenizer: str | None = Field(None, description="Tokenizer folder or hub id, when it differs from `name`.")
    dtype: Dtype = Field(
        "auto",
        description="Dtype of the unquantized weights and of 4-bit compute; auto = bfloat16 on GPUs that support it, "
        "else float16 on GPUs, float32 on the CPU.",
    )
    attn_implementation: Literal["auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2", "flash_attention_3"] = (
        Field(
            "auto",
            description="Attention kernel passed to transformers; auto = flash_attention_3 / flash_attention_2 when "
            "the package is installed and the GPU supports it (Hopper / Ampere or newer, 16-bit dtype), else sdpa; "
            "on the CPU, when packing, sdpa becomes sdpa_varlen (SDPA run per packed example, no dense block mask) "
            "for models with plain causal attention. The run logs what it picked and why.",
        )
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model repository. Off unless you trust its author."
    )
    allow_pickle: bool = Field(
        False,
        description="Accept a base model that ships only pickle weights (.bin/.pt), which can run code when loaded; "
        "off = safetensors only.",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template replacing the tokenizer's own: a built-in name (chatml, qwen, llama-3, mistral, "
        "llama-2, alpaca, gemma), inline Jinja text or a .jinja file path; null = the tokenizer's.",
    )

    @model_validator(mode="after")
    def _known_template_name(self) -> ModelConfig:
        value = self.chat_template
        if value is not None and looks_like_template_name(value) and builtin_template(value) is None:
            raise FieldError("chat_template", f"unknown template '{value}'; built-ins: {', '.join(BUILTIN_TEMPLATES)}")
        return self


class QuantizationConfig(StrictModel):
    bits: Literal[4, 8] | None = Field(
        None, description="Load the frozen base in 4-bit (QLoRA) or 8-bit with bitsandbytes; null = unquantized."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (saves ~0.4 bit).")
    compute_dtype: Dtype = Field("auto", description="Dtype of 4-bit matmuls; auto = the model dtype.")

    @model_validator(mode="after")
    def _four_bit_options_need_four_bits(self) -> QuantizationConfig:
        # Compared with the defaults, not model_fields_set: the resolved recipe of an unquantized run (every
        # default spelled out, as written to RUN_DIR/recipe.yaml) must load again for eval, merge and chat.
        four_bit_only = [
            k for k in ("compute_dtype", "double_quant", "quant_type") if getattr(self, k) != _default(self, k)
        ]
        if four_bit_only and self.bits != 4:
            key = sorted(four_bit_only)[0]
            raise FieldError(key, f"applies to 4-bit quantization only, but bits is {self.bits}; set bits: 4")
        return self

    @model_serializer(mode="wrap")
    def _only_set_bits_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A resolved recipe of an unquantized or 8-bit run must validate again: leave out the 4-bit options."""
        data = handler(self)
        return data if self.bits == 4 else {"bits": data["bits"]}


class AdapterConfig(StrictModel):
    method: Method = Field(
        "lora",
        description="What is trained: lora (QLoRA = lora + quantization.bits: 4), ia3, adalora, loha, lokr, "
        "prompt_tuning, prefix_tuning, p_tuning, partial (the last blocks and/or named modules) or full; each method "
        "reads only its own keys (docs/methods.md).",
    )
    r: PositiveInt = Field(16, description="Rank (lora, loha, lokr; adalora: the initial rank).")
    alpha: PositiveFloat = Field(32, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Modules that get an adapter: 'all-linear', a list of names (q_proj, v_proj...) or a regex "
        "matched against the full module name.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling: alpha / sqrt(r) instead of alpha / r.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules trained in full and saved with the adapter (e.g. lm_head)."
    )
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default",
        description="LoRA initialisation: default (B = 0), gaussian, pissa / olora (principal directions of the "
        "weights; unquantized base; saved converted to plain LoRA), loftq (4-bit base only: A and B absorb the "
        "quantization error).",
    )
    loraplus_lr_ratio: PositiveFloat | None = Field(
        None, description="LoRA+: B's learning rate is this many times A's (the paper suggests 16); null = off."
    )
    rank_pattern: dict[str, PositiveInt] = Field(
        default_factory=dict, description="Per-module rank overriding r: {regex or name: rank}, e.g. {'.*mlp.*': 4}."
    )
    alpha_pattern: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="Per-module alpha overriding alpha: {regex or name: alpha}."
    )
    feedforward_modules: list[str] = Field(
        default_factory=list,
        description="IA3: the target modules whose input (not output) is scaled; a subset of target_modules.",
    )
    target_r: PositiveInt = Field(8, description="AdaLoRA: average rank left after pruning.")
    tinit: int = Field(0, ge=0, description="AdaLoRA: steps of full rank before pruning starts.")
    tfinal: int = Field(0, ge=0, description="AdaLoRA: steps at the final rank before training ends.")
    delta_t: PositiveInt = Field(1, description="AdaLoRA: steps between two rank reallocations.")
    num_virtual_tokens: PositiveInt = Field(
        20, description="Prompt learning: virtual tokens prepended (or prefixed to every layer's keys/values)."
    )
    prompt_init_text: str | None = Field(
        None, description="Prompt tuning: initialise the virtual tokens from this text; null = random."
    )
    encoder_hidden_size: PositiveInt | None = Field(
        None, description="P-tuning: hidden size of the prompt encoder MLP; null = the model's hidden size."
    )
    last_n_layers: int = Field(0, ge=0, description="Partial: train the last N transformer blocks in full.")
    modules: list[str] = Field(
        default_factory=list,
        description="Partial: also train these modules in full (names or suffixes such as lm_head, norm).",
    )
    init_from: str | None = Field(
        None,
        description="Sequential fine-tuning: continue training the adapter of this earlier run (its run directory "
        "or adapter folder); its adapter settings are kept. To start from a merged model, set model.name instead.",
    )

    @model_validator(mode="after")
    def _targets_not_empty(self) -> AdapterConfig:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise FieldError("target_modules", "is empty; name modules, give a regex, or use 'all-linear'")
        return self

    @model_validator(mode="after")
    def _keys_fit_method(self) -> AdapterConfig:
        check_adapter(self)
        return self

    @model_serializer(mode="wrap")
    def _only_method_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A resolved recipe lists the keys its method reads, so it validates again (and reads clearly)."""
        keep = CONTINUE_KEYS if self.init_from is not None else METHOD_KEYS[self.method] | {"method"}
        return {k: v for k, v in handler(self).items() if k in keep}


DataFormat = Literal[
    "auto", "messages", "alpaca", "sharegpt", "prompt_completion", "text", "preference", "kto", "prompts"
]


class DatasetConfig(StrictModel):
    path: str = Field(
        description="A local .jsonl, .json (array), .csv or .parquet file, a folder written by "
        "datasets' save_to_disk, or (when online) a hub dataset name."
    )
    format: DataFormat = Field(
        "auto",
        description="messages: OpenAI-style {role, content} lists; alpaca: instruction/input/output; sharegpt: "
        "`conversations` of {from, value} (tool calls too); prompt_completion: prompt/completion pairs; text: raw "
        "text, all trained, no chat template; preference, kto: preference rows (docs/preference.md); prompts: prompt "
        "rows with reference columns for online RL (docs/rl.md); auto: detected from the first row's columns.",
    )
    split: str = Field(
        "train", description="Split to read from a hub dataset or a save_to_disk folder holding several splits."
    )
    limit: PositiveInt | None = Field(None, description="Use at most this many rows (the first ones).")
    weight: PositiveFloat = Field(
        1.0,
        le=MAX_WEIGHT,
        description="Mixing weight of a training source: its training rows are repeated (weight > 1) or sampled "
        "(weight < 1) to round(weight x rows), seeded; applied after the held-out splits are taken.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping {format field: your column}, e.g. {instruction: question, output: answer}.",
    )
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")


class DataConfig(StrictModel):
    split: bool | list[float] = Field(
        False,
        description="Split the training sources by ratio into train/validation/test: true = 8:1:1, or a list of "
        "2 (train, validation) or 3 (train, validation, test) weights such as [90, 5, 5]; seeded by training.seed.",
    )
    dedupe: Literal["exact", "normalized", "none"] = Field(
        "exact",
        description="Drop duplicate examples: exact = identical after conversion; normalized = also ignoring case, "
        "whitespace and punctuation; none = keep them (duplicates still never land in two splits).",
    )
    too_long: Literal["truncate", "drop"] = Field(
        "truncate", description="Examples longer than training.max_length: cut to it, or drop them."
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="A malformed line or row: error = stop naming file, row and field; skip = drop it and report "
        "the count and first row numbers.",
    )
    min_rows: PositiveInt = Field(
        1, description="Stop with an error when fewer training rows than this survive cleaning and truncation."
    )
    num_proc: PositiveInt | None = Field(
        None,
        description="Processes that tokenize; null = all CPU cores (up to 8) for 10,000 rows or more, else 1.",
    )
    thinking: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Reasoning templates (Qwen3, QwQ, DeepSeek-R1 distills, SmolLM3): render with the template's "
        "thinking on or off (its enable_thinking). auto = on for a row whose answer has reasoning "
        "(reasoning_content or a <think> block), off for one without; inference uses the run's setting.",
    )

    @model_validator(mode="after")
    def _split_shape(self) -> DataConfig:
        if isinstance(self.split, list):
            if len(self.split) not in (2, 3):
                raise FieldError("split", f"has {len(self.split)} values; expected [train, validation(, test)]")
            if self.split[0] <= 0 or min(self.split) < 0:
                raise FieldError("split", "shares must be >= 0, and the train share above 0")
        return self

    @property
    def split_ratios(self) -> tuple[float, float, float] | None:
        """(train, validation, test) shares summing to 1, or None when the recipe asks for no ratio split."""
        if self.split is False:
            return None
        weights = [8.0, 1.0, 1.0] if self.split is True else [*self.split, 0.0][:3]
        total = sum(weights)
        return (weights[0] / total, weights[1] / total, weights[2] / total)


LrScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
]
Optimizer = Literal[
    "auto",
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
]


class TrainingConfig(StrictModel):
    objective: Objective = Field(
        "sft",
        description="sft: supervised fine-tuning on chat/instruction data; dpo, orpo, simpo: preference tuning on "
        "prompt/chosen/rejected rows; kto: on prompt/completion/label rows (settings in `preference:`; "
        "docs/preference.md).",
    )
    learning_rate: PositiveFloat = Field(2e-4, description="Peak learning rate.")
    num_epochs: PositiveFloat = Field(
        1.0, le=MAX_EPOCHS, description="Passes over the training data (ignored when max_steps is set)."
    )
    max_steps: PositiveInt | None = Field(None, le=MAX_STEPS, description="Stop after this many optimizer steps.")
    batch_size: PositiveInt = Field(4, description="Examples per device per forward pass.")
    eval_batch_size: PositiveInt | None = Field(
        None, description="Examples per device when evaluating; default batch_size."
    )
    gradient_accumulation_steps: PositiveInt = Field(1, description="Forward passes per optimizer step.")
    max_length: PositiveInt | None = Field(1024, description="Longest tokenized example; longer ones are truncated.")
    packing: bool = Field(
        True,
        description="Pack several examples into each max_length row, padding-free with position ids restarting per "
        "example so examples never attend to each other (needs max_length; off when max_length is null; see "
        "docs/data.md#packing).",
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant",
        description="Tokens in the loss: assistant = every assistant turn and its end-of-turn marker, nothing of "
        "system/user/tool turns; all = the whole rendered conversation.",
    )
    lr_scheduler: LrScheduler = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: float = Field(
        0.03, ge=0, description="Warmup length: a step count when >= 1, else a fraction of all steps."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Optimizer = Field(
        "auto",
        description="Optimizer; auto = paged_adamw_8bit for a quantized base on a GPU (a quarter of AdamW's state, "
        "paged to CPU RAM under memory pressure), else adamw_torch.",
    )
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for initialisation, shuffling and dropout.")
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in backward to save memory (non-reentrant checkpointing)."
    )
    activation_offloading: bool = Field(
        False,
        description="Move the activations saved for backward to CPU RAM (TRL's offloading; a GPU lever: less GPU "
        "memory for some speed; ignored on the CPU).",
    )
    liger: bool = Field(
        False,
        description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU) in the model; needs a CUDA GPU and "
        "`pip install 'lora-tune[liger]'`. The LM-head loss is already chunked by TRL.",
    )
    tiled_mlp: bool | Literal["auto"] = Field(
        "auto",
        description="Run each decoder layer's MLP over the sequence in tiles (forward and recompute), so one layer's "
        "backward working set stops growing with the sequence: long context for one more MLP forward per layer "
        "(docs/speed-and-memory.md). auto = on when max_length >= 16,384 tokens; Llama, Mistral, "
        "Qwen2/3, Phi-3 and Gemma 2/3 MLPs.",
    )
    logging_steps: PositiveInt = Field(10, description="Log loss and learning rate every N steps.")
    eval_strategy: Literal["no", "steps", "epoch"] = Field(
        "no", description="When to evaluate on the validation data."
    )
    eval_steps: PositiveInt | None = Field(None, description="Evaluate every N steps (eval_strategy: steps).")
    save_strategy: Literal["no", "steps", "epoch"] = Field("steps", description="When to write a checkpoint.")
    save_steps: PositiveInt = Field(500, description="Write a checkpoint every N steps (save_strategy: steps).")
    save_total_limit: PositiveInt | None = Field(2, description="Keep at most this many checkpoints.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers to log to besides metrics.jsonl."
    )
    resume: Literal["no", "auto"] = Field(
        "no",
        description="auto = continue from the newest complete checkpoint in output_dir when there is one (as "
        "`train --resume` does), else start; no = start a new run.",
    )
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        "auto", description="Autocast precision; auto = bf16 or fp16 on a GPU by the model dtype, none on the CPU."
    )
    early_stopping_patience: PositiveInt | None = Field(
        None,
        description="Stop training after this many evaluations in a row without improvement of best_metric (needs "
        "eval_strategy); implies keep_best. null = train to the end.",
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0, description="Smallest change of best_metric that counts as an improvement for early stopping."
    )
    keep_best: bool = Field(
        False,
        description="Make the saved adapter the checkpoint with the best validation metric, not the last step "
        "(needs a checkpoint at each evaluation: save_strategy = eval_strategy, save_steps a multiple of eval_steps).",
    )
    best_metric: Literal[
        "loss", "mean_token_accuracy", "rewards/accuracies", "rewards/margins", "accuracy", "reward"
    ] = Field(
        "loss",
        description="Validation metric that picks the best checkpoint, drives early stopping and "
        "reduce_lr_on_plateau: loss (lower is better; perplexity ranks the same) or mean_token_accuracy (higher); "
        "preference runs (dpo, orpo, simpo): rewards/accuracies or rewards/margins (higher); classification: "
        "accuracy (higher); online RL (grpo, rloo): reward, the held-out mean total reward (higher).",
    )
    plateau_patience: int = Field(
        1,
        ge=0,
        description="reduce_lr_on_plateau: evaluations without improvement that are tolerated; the next one cuts "
        "the learning rate (0 = cut at the first).",
    )
    plateau_factor: float = Field(
        0.5, gt=0, lt=1, description="reduce_lr_on_plateau: the factor the learning rate is multiplied by."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        if self.packing and self.max_length is None and "packing" in self.model_fields_set:
            raise FieldError("packing", "needs max_length: set training.max_length, or packing: false")
        if self.eval_steps is not None and self.eval_strategy != "steps":
            raise FieldError(
                "eval_steps", f"is set but eval_strategy is '{self.eval_strategy}'; set eval_strategy: steps"
            )
        _check_best_checkpoint_control(self)
        if self.tiled_mlp is True and self.liger:
            raise FieldError("tiled_mlp", "and liger exclude each other (Liger's SwiGLU replaces the MLP forward)")
        return self

    @property
    def keeps_best(self) -> bool:
        """The final adapter is the best checkpoint: asked for directly, or by early stopping."""
        return self.keep_best or self.early_stopping_patience is not None


def _check_best_checkpoint_control(t: TrainingConfig) -> None:
    """Early stopping, keep_best and reduce_lr_on_plateau all read a validation metric: each needs evaluations,
    and keeping the best needs a checkpoint written at every evaluation (transformers refuses otherwise)."""
    # Compared with the defaults, not model_fields_set: a resolved recipe (every default spelled out) must reload.
    plateau_only = [k for k in ("plateau_patience", "plateau_factor") if getattr(t, k) != _default(t, k)]
    if plateau_only and t.lr_scheduler != "reduce_lr_on_plateau":
        key = sorted(plateau_only)[0]
        raise FieldError(key, f"applies to lr_scheduler: reduce_lr_on_plateau only, but it is '{t.lr_scheduler}'")
    if t.early_stopping_threshold != _default(t, "early_stopping_threshold") and t.early_stopping_patience is None:
        raise FieldError("early_stopping_threshold", "applies to early stopping only; set early_stopping_patience")
    users = [
        (key, on)
        for key, on in (
            ("early_stopping_patience", t.early_stopping_patience is not None),
            ("keep_best", t.keep_best),
            ("lr_scheduler", t.lr_scheduler == "reduce_lr_on_plateau"),
        )
        if on
    ]
    if users and t.eval_strategy == "no":
        raise FieldError(users[0][0], "reads the validation metric, but eval_strategy is 'no'; set eval_strategy")
    if not t.keeps_best:
        return
    key = "early stopping" if t.early_stopping_patience is not None else "keep_best"
    if t.save_strategy != t.eval_strategy:
        raise FieldError(
            "save_strategy",
            f"is '{t.save_strategy}' but {key} needs a checkpoint at each evaluation; "
            f"set save_strategy: {t.eval_strategy}",
        )
    every = t.eval_steps or t.logging_steps  # transformers evaluates every logging_steps when eval_steps is unset
    if t.eval_strategy == "steps" and t.save_steps % every != 0:
        raise FieldError(
            "save_steps",
            f"{t.save_steps} is not a multiple of eval_steps {every}; {key} needs a checkpoint at each evaluation "
            f"(e.g. save_steps: {every})",
        )


def _default(section: StrictModel, key: str) -> object:
    return type(section).model_fields[key].default


class EvalConfig(StrictModel):
    """`lora-tune eval`, `generate` and `chat`: how answers are generated and how they are scored."""

    max_new_tokens: PositiveInt = Field(64, description="Longest generated answer, in tokens.")
    do_sample: bool = Field(False, description="Sample (temperature, top_p) instead of greedy decoding.")
    temperature: PositiveFloat = Field(1.0, description="Sampling temperature (do_sample: true only).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (do_sample: true only).")
    stop_on_eos: bool = Field(
        True, description="Stop at the end-of-turn/EOS token; false = always generate max_new_tokens."
    )
    batch_size: PositiveInt = Field(16, description="Prompts generated together (left-padded) by `lora-tune eval`.")
    task: Literal["auto", "text", "labels"] = Field(
        "auto",
        description="How answers are scored besides exact match: labels = classification metrics (accuracy, "
        "precision/recall/F1, confusion matrix); text = exact match only; auto = labels when `labels` is set or the "
        "references look like a small label set (2-20 distinct answers, each at least twice on average).",
    )
    labels: list[str] = Field(
        default_factory=list,
        description="The label set of a classification-style task; empty = inferred from the references.",
    )
    examples: int = Field(5, ge=0, description="Example generations shown in the report.")

    @model_validator(mode="after")
    def _sampling_options_need_sampling(self) -> EvalConfig:
        # Compared with the defaults, not model_fields_set: a resolved recipe (every default spelled out) reloads.
        sampling_only = [k for k in ("temperature", "top_p") if getattr(self, k) != _default(self, k)]
        if sampling_only and not self.do_sample:
            key = sorted(sampling_only)[0]
            raise FieldError(key, "applies to sampling only, but do_sample is false; set do_sample: true")
        if self.task == "text" and self.labels:
            raise FieldError("labels", "is set but task is 'text'; set task: labels (or auto)")
        return self


class PreflightConfig(StrictModel):
    on_failure: Literal["error", "warn"] = Field(
        "error",
        description="What `train` does when a pre-flight check (see `lora-tune check`) fails: error = refuse to "
        "start (exit 2); warn = log the failures and train anyway.",
    )
    truncated_answers: Literal["error", "warn"] = Field(
        "warn",
        description="Rows that training.max_length cuts inside an assistant answer train a reply without its stop "
        "token: warn = report their count; error = fail the pre-flight check.",
    )
    sample_rows: PositiveInt | None = Field(
        500, description="Rows the pre-flight check reads per dataset (a seeded sample of larger ones); null = all."
    )


class DistributedConfig(StrictModel):
    """How several processes share the work when a launcher starts them (`lora-tune train --nproc N`, torchrun,
    accelerate launch); a single process ignores it. See docs/multi-gpu.md."""

    strategy: Literal["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"] = Field(
        "ddp",
        description="ddp = a full copy of the (quantized) model per GPU; fsdp = shard the base weights (FSDP-QLoRA "
        "with 4-bit); deepspeed-zero2 = shard optimizer state and gradients; deepspeed-zero3 = also the weights.",
    )
    accelerate_config: str | None = Field(
        None,
        description="An accelerate config file (e.g. recipes/accelerate/fsdp-qlora.yaml) that `train --nproc` "
        "launches with and that sets the strategy instead of `strategy`.",
    )
    deepspeed_config: str | None = Field(
        None,
        description="A DeepSpeed JSON replacing the one shipped for the deepspeed-* strategy; batch sizes must be "
        '"auto".',
    )


class TaskConfig(StrictModel):
    type: Literal["sft", "classification"] = Field(
        "sft",
        description="sft: supervised fine-tuning of the causal LM on chat/instruction data; classification: a new "
        "sequence-classification head on the causal LM base, trained on text/label rows "
        "(docs/methods.md#task-heads-classification).",
    )
    text_column: str = Field("text", description="Classification: the column holding the text.")
    label_column: str = Field("label", description="Classification: the column holding the label name.")
    labels: list[str] = Field(
        default_factory=list, description="Classification: the label names; their order gives the class ids."
    )

    @model_validator(mode="after")
    def _labels_fit_type(self) -> TaskConfig:
        classification_only = {"text_column", "label_column", "labels"} & self.model_fields_set
        if self.type == "sft" and classification_only:
            raise FieldError(sorted(classification_only)[0], "applies to type: classification only")
        if self.type == "classification" and len(set(self.labels)) < 2:
            raise FieldError("labels", "needs at least two distinct label names for classification")
        if len(set(self.labels)) != len(self.labels):
            raise FieldError("labels", "names a label twice")
        return self

    @model_serializer(mode="wrap")
    def _only_type_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return data if self.type == "classification" else {"type": data["type"]}


class PreferenceConfig(StrictModel):
    """Settings of the preference objectives; each objective reads only its own (recipe.rules.OBJECTIVES)."""

    beta: PositiveFloat | None = Field(
        None,
        description="Strength of the preference term: dpo/kto: deviation from the reference policy (default 0.1); "
        "orpo: weight of the odds-ratio loss (default 0.1); simpo: reward scale (default 2.0).",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="dpo: sigmoid (DPO), ipo (IPO), hinge (SLiC), robust (label-noise robust DPO)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo (sigmoid/robust) and simpo: assumed share of flipped preference labels."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin, as a ratio of beta.")
    desirable_weight: PositiveFloat = Field(1.0, description="kto: weight of the desirable (label true) rows.")
    undesirable_weight: PositiveFloat = Field(1.0, description="kto: weight of the undesirable (label false) rows.")
    precompute_ref_log_probs: bool = Field(
        False,
        description="dpo/kto: compute the reference log-probabilities once before training (one pass over the "
        "data), so no reference forward runs during training: the tightest memory.",
    )


RewardName = Literal["answer", "format", "length"]
REWARD_KEYS = {"answer": {"column"}, "format": {"pattern"}, "length": {"target"}, "function": set()}
THINK_FORMAT = r"\s*<think>.*?</think>\s*\S.*"  # the format reward's default: reasoning, then an answer


class RewardConfig(StrictModel):
    """One reward of an online RL run: a built-in checker (`name`) or the user's function (`function`)."""

    name: RewardName | None = Field(
        None,
        description="Built-in: answer = 1 when the completion's final answer equals the row's reference (after "
        "</think>, the last \\boxed{} or '####' answer; numbers compared as numbers), else 0; format = 1 when the "
        "whole completion matches `pattern`; length = 1 up to `target` completion tokens, then target / length.",
    )
    function: str | None = Field(
        None,
        description="Your reward: 'file.py:function' (path relative to the working directory), called as TRL calls "
        "reward functions: (prompts, completions, completion_ids, **columns) -> one float per completion.",
    )
    weight: float = Field(1.0, description="Weight of this reward in the total reward.")
    column: str = Field("answer", description="answer: the data column holding the reference answer.")
    pattern: str | None = Field(None, description=f"format: a regular expression (default {THINK_FORMAT!r}).")
    target: PositiveInt | None = Field(None, description="length: completion tokens that earn the full reward.")

    @model_validator(mode="after")
    def _one_kind(self) -> RewardConfig:
        if (self.name is None) == (self.function is None):
            raise FieldError("name", "a reward is a built-in name (answer, format, length) or a function, not both")
        kind = self.name or "function"
        foreign = sorted(self.model_fields_set - REWARD_KEYS[kind] - {"name", "function", "weight"})
        if foreign:
            raise FieldError(foreign[0], f"does not apply to a {kind} reward")
        if kind == "length" and self.target is None:
            raise FieldError("target", "a length reward needs target: the completion tokens that earn its full reward")
        if self.function is not None and not re.fullmatch(r".+\.py:[A-Za-z_]\w*", self.function):
            raise FieldError("function", f"{self.function!r}: expected 'file.py:function_name'")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise FieldError("pattern", f"is not a regular expression: {exc}") from None
        return self

    @model_serializer(mode="wrap")
    def _keys_of_its_kind(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Only the keys this kind of reward reads, so the resolved recipe reads back."""
        data = handler(self)
        reads = {"name", "function", "weight", *REWARD_KEYS[self.name or "function"]}
        return {k: v for k, v in data.items() if k in reads and v is not None}

    @property
    def label(self) -> str:
        """The reward's name in metrics and reports: the built-in name or the function's name."""
        return self.name or (self.function or "").rpartition(":")[2]


class RLConfig(StrictModel):
    """Settings of the online RL objectives (grpo, rloo); each objective reads only its own (recipe.rules)."""

    num_generations: int = Field(
        4,
        ge=2,
        description="Completions sampled per prompt; rewards are compared within each prompt's group (8-16 is "
        "common on a GPU; training.batch_size counts completions and holds whole groups).",
    )
    max_completion_length: PositiveInt = Field(256, description="Longest sampled completion, in tokens.")
    temperature: PositiveFloat = Field(1.0, description="Sampling temperature of the completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass of the completions.")
    beta: float | None = Field(
        None,
        ge=0,
        description="KL penalty towards the starting policy; 0 loads no reference (grpo's default; rloo: 0.05).",
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo"] = Field(
        "dapo", description="grpo: how token losses are averaged (TRL's loss_type; dapo has no length bias)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="grpo: divide advantages by the reward spread of the group, the batch, or not at all."
    )
    normalize_advantages: bool = Field(False, description="rloo: normalize advantages per generation batch.")
    steps_per_generation: PositiveInt | None = Field(
        None, description="Optimizer steps per batch of generations; default: gradient_accumulation_steps."
    )
    rewards: list[RewardConfig] = Field(
        default_factory=lambda: [RewardConfig(name="answer")],
        min_length=1,
        description="The rewards; the total is their weighted sum. Default: the answer reward.",
    )
    use_vllm: bool = Field(False, description="Generate with vLLM (GPU only; pip install vllm).")
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="vLLM in the training process (colocate) or a `trl vllm-serve` server."
    )
    log_completions: int = Field(
        4, ge=0, description="Sampled completions with their rewards written to completions.jsonl at each log step."
    )


class VisionConfig(StrictModel):
    """A vision-language run (docs/vision.md): the base is an image-text-to-text model, the data has images. What
    is trained is chosen here; LoRA/QLoRA always trains the language model (adapter.target_modules: all-linear is
    its linear layers only), and the vision tower and projector are never quantized."""

    train_projector: bool = Field(
        False,
        description="Also train the projector (the layers that map image features to the language model) in full; "
        "it is small and saved with the adapter.",
    )
    train_vision_tower: bool = Field(
        False, description="Also put LoRA on the vision tower's linear layers (kept in the model dtype, not 4-bit)."
    )
    max_image_side: PositiveInt = Field(
        4096,
        description="An image whose longer side has more pixels than this is refused (file, row, image named); the "
        "processor then resizes what is kept by its own rules.",
    )
    max_images: PositiveInt = Field(8, description="Most images one conversation may hold.")


class Recipe(StrictModel):
    """A whole run: what to load, how to adapt it, on what data, how to train, and where to write."""

    model: ModelConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    datasets: list[DatasetConfig] = Field(min_length=1, description="Training data: one or more sources, mixed.")
    eval_datasets: list[DatasetConfig] = Field(default_factory=list, description="Validation data.")
    test_datasets: list[DatasetConfig] = Field(
        default_factory=list, description="Test data, written to the run's test.jsonl for `lora-tune eval`."
    )
    val_size: float = Field(
        0.0, ge=0, lt=1, description="Fraction of the training rows held out for validation (when no eval_datasets)."
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="Preference objectives' settings (training.objective)."
    )
    rl: RLConfig = Field(default_factory=RLConfig, description="Online RL objectives' settings (grpo, rloo).")
    preflight: PreflightConfig = Field(default_factory=PreflightConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="Generation and scoring for `lora-tune eval`, `generate`, `chat`."
    )
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    vision: VisionConfig | None = Field(
        None, description="Set for a vision-language run: images in the conversations (docs/vision.md)."
    )
    output_dir: str = Field(description="Run directory: adapter, tokenizer, resolved recipe, metrics, checkpoints.")

    @model_serializer(mode="wrap")
    def _preference_keys_of_its_objective(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The resolved recipe lists the preference settings its objective reads (all of them for sft would be
        refused when the saved recipe is read back), and no `preference:` section at all for sft; a preference
        recipe leaves out the training keys only sft reads."""
        data = handler(self)
        needs = OBJECTIVES[self.training.objective]
        for section, keep in (("preference", needs.preference_keys), ("rl", needs.rl_keys)):
            if keep:
                data[section] = {k: v for k, v in data[section].items() if k in keep}
            else:
                data.pop(section, None)
        for key, kinds in HONOURED_BY.items():  # what this run ignores would be refused when read back
            section, _, name = key.partition(".")
            if self.run_kind not in kinds and section in data:
                if name:
                    data[section].pop(name, None)
                else:
                    data.pop(section)
        if self.vision is None:
            data.pop("vision", None)
        else:  # a vision run never packs: the resolved recipe says so, and reads back
            data["training"]["packing"] = False
        return data

    @property
    def run_kind(self) -> str:
        """What kind of run this is: "classification", else the training objective (sft, dpo, orpo, kto, simpo).
        recipe.rules.HONOURED_BY says which settings each kind honours."""
        return "classification" if self.task.type == "classification" else self.training.objective

    @property
    def task_name(self) -> str:
        """The task that trains this recipe (lora_tune/tasks/<task>/): sft, vision, preference or classification."""
        if self.vision is not None:
            return "vision"
        return self.run_kind if self.run_kind == "classification" else OBJECTIVES[self.run_kind].task

    @property
    def run_dir(self) -> RunDir:
        """The run directory's layout at output_dir (what is in it is named there, in lora_tune.run.layout)."""
        return RunDir(Path(self.output_dir))

    @property
    def local_sources(self) -> list[Path]:
        """The local files and folders a run reads (base model, tokenizer, data, an adapter to continue): its
        output_dir may not be, hold or lie inside any of them. Hub ids, which are not local paths, are left out."""
        named = [self.model.name, self.model.tokenizer, self.adapter.init_from, *(d.path for d in self.datasets)]
        return [Path(name) for name in named if name and Path(name).exists()]

    @model_validator(mode="after")
    def _evaluation_needs_data(self) -> Recipe:
        if self.training.eval_strategy != "no" and not self.has_validation:
            raise FieldError(
                "training.eval_strategy",
                f"is '{self.training.eval_strategy}' but there is no validation data; "
                "add eval_datasets, set val_size > 0, or data.split with a validation share",
            )
        if self.eval_datasets and self.val_size > 0:
            raise FieldError("val_size", "give validation data once: either eval_datasets or val_size, not both")
        self._check_data_split()
        check_objective(self)
        return self

    def _check_data_split(self) -> None:
        ratios = self.data.split_ratios
        if ratios is not None and self.val_size > 0:
            raise FieldError("val_size", "give the split once: data.split (train/validation/test) or val_size")
        if ratios is not None and ratios[1] > 0 and self.eval_datasets:
            raise FieldError("data.split", "has a validation share but eval_datasets are given; use [train, 0, test]")
        if ratios is not None and ratios[2] > 0 and self.test_datasets:
            raise FieldError("data.split", "has a test share but test_datasets are given; use [train, validation]")
        for section in ("eval_datasets", "test_datasets"):
            for index, source in enumerate(getattr(self, section)):
                # By value, not by presence: a resolved recipe (recipe.yaml of a run) writes every default out.
                if source.weight != 1.0:
                    raise FieldError(f"{section}.{index}.weight", "applies to training sources (datasets) only")

    @model_validator(mode="after")
    def _vision_is_sft(self) -> Recipe:
        if self.vision is None:
            return self
        if self.run_kind != "sft":
            key = "task.type" if self.run_kind == "classification" else "training.objective"
            raise FieldError(key, f"is {self.run_kind}; a vision run (vision:) is supervised fine-tuning (sft) only")
        if self.training.packing and "packing" in self.training.model_fields_set:
            raise FieldError("training.packing", "packs rows of several examples; images are not packed: remove it")
        if self.training.train_on != "assistant":
            raise FieldError("training.train_on", "must be assistant in a vision run (image tokens are never trained)")
        if self.adapter.method != "lora":
            raise FieldError("adapter.method", f"is {self.adapter.method}; a vision run trains lora (or QLoRA)")
        if self.data.on_bad_rows == "skip":
            raise FieldError("data.on_bad_rows", "skip is not applied to image rows: a bad image row stops the run")
        for section in ("datasets", "eval_datasets", "test_datasets"):
            for index, source in enumerate(getattr(self, section)):
                unread = [k for k in ("columns", "system_prompt", "weight") if k in source.model_fields_set]
                if unread and (source.columns or source.system_prompt is not None or source.weight != 1.0):
                    raise FieldError(f"{section}.{index}.{unread[0]}", "is not applied to image rows yet; remove it")
        return self

    @model_validator(mode="after")
    def _strategy_fits(self) -> Recipe:
        try:
            check_distributed_section(self)
        except DistributedError as exc:
            key = exc.key if "." in exc.key else f"distributed.{exc.key}"
            raise FieldError(key, str(exc)) from exc
        return self

    @model_validator(mode="after")
    def _method_fits_recipe(self) -> Recipe:
        check_recipe(self)
        return self

    @property
    def has_validation(self) -> bool:
        ratios = self.data.split_ratios
        return bool(self.eval_datasets) or self.val_size > 0 or (ratios is not None and ratios[1] > 0)
