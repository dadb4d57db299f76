"""Builders, recipe texts and runners that more than one test module uses.

A plain module (neither a test module nor a conftest): test modules import their shared helpers from here, never
from one another (tests/unit/test_layout.py checks that). Fixtures shared between modules live in a conftest.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_tune.cli import main
from lora_tune.plan.catalog import list_catalog, shipped_config
from lora_tune.quickstart.tiny import CHAT_TEMPLATE, build_tokenizer
from lora_tune.recipe.load import load_recipe
from tests.conftest import CORPUS, FRUITS, fruit_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


# QLoRA training (tests/e2e/test_train_qlora.py and the runs that reuse its recipe)

QLORA_RECIPE = """\
model:
  name: {model}
  dtype: float32
quantization:
  bits: 4
adapter:
  r: 8
  alpha: 16
  dropout: 0.0
datasets:
  - path: {data}
val_size: 0.1
training:
  learning_rate: 2.0e-2
  max_steps: 30
  batch_size: 4
  max_length: 64
  warmup_steps: 0
  logging_steps: 5
  eval_strategy: steps
  eval_steps: 15
  save_steps: 15
  gradient_checkpointing: false
  packing: false            # the loss-drop threshold below was set on padded batches (BFD packing groups by length)
output_dir: {out}
"""


# Kill-and-resume runs (tests/e2e/test_resume.py, test_faults.py, test_divergence.py, test_safety.py)

MAX_STEPS, SAVE_STEPS = 8, 2

RESUME_RECIPE = """\
model:
  name: {model}
  dtype: float32
adapter:
  r: 4
  alpha: 8
  dropout: 0.1
datasets:
  - path: {data}
training:
  learning_rate: 1.0e-2
  max_steps: {max_steps}
  batch_size: 4
  max_length: 64
  warmup_steps: 2
  logging_steps: 1
  save_steps: {save_steps}
  save_total_limit: 3
  gradient_checkpointing: false
output_dir: {out}
"""


def write_resume_recipe(root: Path, model: Path, name: str, quantized: bool = False) -> Path:
    """A run over 24 rows: 6 batches per epoch, so 8 steps cross an epoch boundary (the data order reshuffles).

    `quantized`: on a 4-bit NF4 base (QLoRA), whose adapter TRL trains in bfloat16.
    """
    data = root / "train.jsonl"
    if not data.exists():
        write_jsonl(data, fruit_rows(24, "alpaca"))
    recipe = root / f"{name}.yaml"
    text = RESUME_RECIPE.format(model=model, data=data, out=root / name, max_steps=MAX_STEPS, save_steps=SAVE_STEPS)
    if quantized:
        text = text.replace("datasets:", "quantization:\n  bits: 4\ndatasets:")
    recipe.write_text(text)
    return recipe


def run_cli(*args: str, fault: tuple[str, int] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`lora-tune ARGS` in a fresh process (optionally with a fault injected), output captured."""
    command = [sys.executable, "-m", "lora_tune.cli", *args]
    if fault is not None:
        command = [sys.executable, "-m", "tests.e2e.fault_runner", fault[0], str(fault[1]), "--", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


# Every fine-tuning method (tests/e2e/test_methods.py, test_sequential.py, test_eval_runs.py)

# The shipped tiny method recipes.
TINY_METHODS = ROOT / "recipes" / "methods" / "tiny"

METHODS_RECIPE = """\
model:
  name: {model}
  dtype: float32
quantization:
  bits: {bits}
adapter: {adapter}
datasets:
  - path: {data}
training:
  learning_rate: {lr}
  max_steps: {steps}
  batch_size: 8
  max_length: 64
  warmup_steps: 0
  lr_scheduler: constant
  logging_steps: 1
  save_strategy: "no"
  gradient_checkpointing: false
output_dir: {out}
"""


def write_methods_recipe(
    root: Path, model: Path, adapter: dict[str, Any], lr: float, bits: int | None, steps: int
) -> Path:
    """A recipe written out in full (the sequential tests use it)."""
    data = write_jsonl(root / "train.jsonl", fruit_rows(48, "alpaca"))
    text = METHODS_RECIPE.format(
        model=model,
        bits="null" if bits is None else bits,
        adapter=json.dumps(adapter),
        data=data,
        lr=lr,
        steps=steps,
        out=root / "run",
    )
    path = root / "recipe.yaml"
    path.write_text(text)
    return path


def tiny_recipe(name: str, model: Path, root: Path, steps: int) -> Any:
    """The shipped tiny recipe, pointed at the test's even tinier model and data, for a few steps."""
    data = write_jsonl(root / "train.jsonl", fruit_rows(48, "alpaca"))
    overrides = [
        f"model.name={model}",
        f"datasets.0.path={data}",
        f"output_dir={root / 'run'}",
        f"training.max_steps={steps}",
        "training.logging_steps=1",
        "training.max_length=64",
        "data.dedupe=none",  # the fruit rows repeat on purpose: 48 rows, not 9 distinct ones
    ]
    return load_recipe(TINY_METHODS / f"{name}.yaml", overrides)


LAST_LEARNING_RATES: list[float] = []  # the optimizer's distinct learning rates in the last captured run


def train_capturing(recipe: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """Train the recipe; return the run result and the in-memory trained model, taken as it is saved."""
    from lora_tune import train
    from lora_tune.methods import runtime

    captured: dict[str, Any] = {}
    real_save = runtime.save_artifact

    def spy(recipe, trainer, tokenizer, build, run):  # noqa: ANN001
        captured["model"] = trainer.model
        groups = [g for g in trainer.optimizer.param_groups if g["params"]]  # LoRA+ leaves some groups empty
        LAST_LEARNING_RATES[:] = sorted({g.get("initial_lr", g["lr"]) for g in groups})
        real_save(recipe, trainer, tokenizer, build, run)

    monkeypatch.setattr(runtime, "save_artifact", spy)  # the lifecycle calls it as methods.save_artifact
    result = train(recipe if not isinstance(recipe, Path) else load_recipe(recipe))
    return result, captured["model"]


def logged_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def reload(run: Path, base_dir: Path, bits: int | None) -> Any:
    """The saved artefact through vanilla transformers/peft only."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_tune.model.packed_4bit import keep_unpacked

    if (run / "model").is_dir():
        return AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    from peft import PeftModel

    four_bit = BitsAndBytesConfig(  # the recipe's defaults: NF4, double quantization, model-dtype compute
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    quant = {4: four_bit, 8: BitsAndBytesConfig(load_in_8bit=True)}.get(bits)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=quant)
    # Training computed the 4-bit layers in float32; on an AVX512-BF16 CPU a vanilla load would repack them for
    # bfloat16 inference at the first eval forward (measured 2.9e-3 away), so compare the same function.
    keep_unpacked(base)
    model = PeftModel.from_pretrained(base, run / "adapter")
    if bits is not None:
        # TRL trains a quantized base's adapter in bfloat16 (the QLoRA paper's choice; DoRA magnitudes excepted) and
        # it is saved so; peft loads it into float32 layers. Compute in the dtype that was trained.
        for name, param in model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                param.data = param.data.to(torch.bfloat16)
    return model


def probe_logits(model: Any, tokenizer: Any) -> Any:
    import torch

    batch = tokenizer(["fruit number 3?", "name a fruit: apple"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


# Classification head (tests/e2e/test_classification.py, test_eval_runs.py)

NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

CLASSIFICATION_RECIPE = """\
model:
  name: {model}
  dtype: float32
adapter: {adapter}
task:
  type: classification
  text_column: sentence
  label_column: kind
  labels: [fruit, number]
datasets:
  - path: {train}
eval_datasets:
  - path: {valid}
training:
  learning_rate: {lr}
  max_steps: 30
  batch_size: 8
  max_length: 32
  warmup_steps: 0
  lr_scheduler: constant
  logging_steps: 5
  save_strategy: "no"
  gradient_checkpointing: false
output_dir: {out}
"""


def labelled_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Sentences of four fruit names or four number words; the label says which. Balanced, shuffled."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = "fruit" if i % 2 == 0 else "number"
        words = rng.choices(FRUITS if kind == "fruit" else NUMBERS, k=4)
        rows.append({"sentence": " ".join(words), "kind": kind})
    rng.shuffle(rows)
    return rows


def write_case(root: Path, model: Path, adapter: dict, lr: float) -> Path:
    train = write_jsonl(root / "train.jsonl", labelled_rows(96, seed=1))
    valid = write_jsonl(root / "valid.jsonl", labelled_rows(40, seed=2))
    path = root / "recipe.yaml"
    path.write_text(
        CLASSIFICATION_RECIPE.format(
            model=model, adapter=json.dumps(adapter), train=train, valid=valid, lr=lr, out=root / "run"
        )
    )
    return path


# Pre-flight check (tests/unit/check/test_checks.py, test_check_train.py)

# The assistant's content is not followed by an end-of-turn token: nothing teaches the model to stop.
NO_END_OF_TURN = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] != 'assistant' %}<|end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def model_dir(root: Path, *, template: str = CHAT_TEMPLATE, stops: list[str] | None = None, pad: str | None = None):
    """A tokenizer-only model folder, with a generation config stopping on `stops` (default: the tokenizer's EOS)."""
    from transformers import GenerationConfig

    tokenizer = build_tokenizer(CORPUS * 20, vocab_size=320)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    if pad is not None:
        tokenizer.pad_token = pad
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(root)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in stops] if stops is not None else tokenizer.eos_token_id
    GenerationConfig(eos_token_id=eos, bos_token_id=tokenizer.bos_token_id).save_pretrained(root)
    return root


def write_check_recipe(tmp_path: Path, model_path: Path, rows: list[dict] | None = None, **sections) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", rows if rows is not None else fruit_rows(12, "messages"))
    recipe = {
        "model": {"name": str(model_path)},
        "datasets": [{"path": str(data)}],
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# Hand-made run directories to merge (tests/unit/export/test_merging.py, test_merge_hardening.py, test_export_push.py)

MERGE_RECIPE = """\
model:
  name: {model}
  dtype: float32
adapter:
  r: 4
  alpha: 8
datasets:
  - path: data.jsonl
output_dir: {out}
"""


def make_run(root: Path, base_dir: Path, peft_config, *, seed: int = 0) -> Path:  # noqa: ANN001 - a PeftConfig
    """A run directory as `lora-tune train` lays it out, with an adapter whose update is far from zero."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = root / "run"
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), peft_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name or "lora_embedding_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.rand_like(param))
    model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(run / "adapter")
    (run / "recipe.yaml").write_text(MERGE_RECIPE.format(model=base_dir, out=run))
    (run / "summary.json").write_text(json.dumps({"steps": 3, "train_loss": 1.5, "eval_loss": None}))
    return run


def lora(**kwargs):  # noqa: ANN201
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, **kwargs)


# Push (tests/unit/export/test_push_hardening.py, test_export_push.py, test_exit_codes.py)

TOKEN = "hf_SilentHubTestToken0123456789abcdefXYZ"
TIMEOUT_ENV = "LORA_TUNE_HUB_TIMEOUT"  # documented, so spelled out here rather than imported
PUSH_RECIPE = """\
model:
  name: org/base-model
adapter:
  r: 4
  alpha: 8
datasets:
  - path: data.jsonl
output_dir: {out}
"""


def model_folder(root: Path) -> Path:
    """What `merge` writes, as far as push looks: config.json, a safetensors shard, a card, one nested file."""
    folder = root / "merged"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    (folder / "README.md").write_text("Merged from lora-tune run `my-run`.\n")
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    return folder


def adapter_run(root: Path) -> Path:
    """A run directory as `train` leaves it, with placeholder adapter files (push reads only names and sizes)."""
    run = root / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(PUSH_RECIPE.format(out=run))
    (run / "summary.json").write_text(json.dumps({"steps": 3, "train_loss": 1.5, "eval_loss": None}))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return run


def plant_hazards(folder: Path, outside: Path) -> list[str]:
    """Links out of `folder` (to a file, to a folder) and hidden entries; returns the names push must skip."""
    outside.mkdir()
    (outside / "id_rsa").write_text("PRIVATE KEY")
    (outside / "notes").mkdir()
    (outside / "notes" / "todo.txt").write_text("secret plans")
    (folder / "key.txt").symlink_to(outside / "id_rsa")
    (folder / "home").symlink_to(outside / "notes", target_is_directory=True)
    (folder / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[core]\n")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "upload.lock").write_text("")
    return ["key.txt", "home", ".env", ".git/", ".cache/"]


def run_bounded(argv: Sequence[str], limit_s: float = 5.0) -> tuple[int | None, float]:
    """`main(argv)` in a thread: (exit code, or None if it was still running after `limit_s`; seconds taken)."""
    result: dict[str, int] = {}
    started = time.monotonic()
    thread = threading.Thread(target=lambda: result.setdefault("rc", main(argv)), daemon=True)
    thread.start()
    thread.join(timeout=limit_s)
    return result.get("rc"), time.monotonic() - started


# Tiny models of every catalog architecture (tests/e2e/test_catalog_architectures.py, test_gguf_architectures.py)

CATALOG = ROOT / "recipes"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16}
# Keys whose values are sized for the full model (per-layer lists, RoPE scaling tables): the tiny copy drops them
# and lets the config class derive them for 2 layers and head_dim 16.
# model_type and architectures are passed separately.
DROPPED = (
    *("model_type", "architectures", "rope_scaling", "rope_parameters"),
    *("layer_types", "torch_dtype", "dtype", "_lora_tune_note"),
)


def catalog_by_architecture() -> dict[str, Any]:
    """One catalog entry per model_type (the first by name), covering every architecture the catalog uses."""
    chosen: dict[str, Any] = {}
    for entry in list_catalog(CATALOG):
        config = shipped_config(entry.model, CATALOG)
        if config is not None:
            chosen.setdefault(config["model_type"], entry)
    return chosen


def shrink(config: dict, tokenizer) -> dict:  # noqa: ANN001 - a transformers tokenizer
    """The full config with its sizes replaced by tiny ones; attention layout kept (GQA stays GQA)."""
    small = {k: v for k, v in config.items() if k not in DROPPED}
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    small.update(TINY)
    small["num_key_value_heads"] = 4 if kv == heads else (1 if kv == 1 else 2)
    small.update(vocab_size=len(tokenizer), max_position_embeddings=256)
    small.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    small["pad_token_id"] = tokenizer.pad_token_id
    if small.get("sliding_window"):
        small["sliding_window"] = 16
    if "sliding_window_pattern" in small:
        small["sliding_window_pattern"] = 2  # one sliding and one global layer
    if "query_pre_attn_scalar" in small:
        small["query_pre_attn_scalar"] = TINY["head_dim"]
    if "max_window_layers" in small:
        small["max_window_layers"] = TINY["num_hidden_layers"]
    return small


# ---- llama.cpp and the real vocabularies (GGUF export, serving a .gguf) ------------------------------------------

REAL_TOKENIZERS = ROOT / ".cache" / "real-material" / "tokenizers"  # scripts/real_material.py
LLAMA3_STOPS = [128001, 128009]  # <|end_of_text|>, <|eot_id|>: what Llama 3 instruct models stop on


def require_llama_cpp() -> Any:
    """llama_cpp, required in CI (`make test` installs it); elsewhere a skip that names the install command."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("llama-cpp-python not installed; run: make llama-cpp")
    return llama_cpp


def real_tokenizer_dir(name: str) -> Path:
    """The cached real tokenizer folder `name` (llama-3.1, qwen2.5, ...), or a skip naming the command."""
    folder = REAL_TOKENIZERS / name
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"real tokenizer not in {folder}; run: python scripts/real_material.py")
    return folder


def gguf_llama(path: Path, **kwargs):  # noqa: ANN201 - a llama_cpp.Llama
    """A GGUF file opened in llama.cpp as the GGUF tests open it: a small context, two threads, seeded."""
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=256, n_threads=2, verbose=False, seed=0, **kwargs)


def gguf_prompts(tokenizer) -> list[list[int]]:  # noqa: ANN001
    """Two chat prompts through the model's template, and a plain text with CJK, emoji and spaces, as token ids."""
    chats = [[{"role": "user", "content": f"Name a fruit like {a} or {b}."}] for a, b in [("fig", "kiwi"), ("x", "y")]]
    texts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return [*ids, tokenizer("Plain text 你好 🎉  with spaces\n")["input_ids"]]


def max_logit_difference(merged: Path, gguf_file: Path) -> float:
    """The largest |logit| difference between llama.cpp on `gguf_file` and transformers on the folder it was made
    from, over gguf_prompts' tokens."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    llm = gguf_llama(gguf_file, logits_all=True)
    worst = 0.0
    try:
        for ids in gguf_prompts(tokenizer):
            with torch.no_grad():
                reference = model(torch.tensor([ids])).logits[0].numpy()
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)])
            worst = max(worst, float(np.abs(got - reference).max()))
    finally:
        llm.close()
    return worst


# Online RL on the tiny 4-bit model (tests/e2e/test_rl.py, test_rl_export.py): a recipe and prompt rows with answers.
RL_RECIPE = """\
model:
  name: {model}
  dtype: float32
quantization:
  bits: 4
adapter:
  r: 8
  alpha: 16
  dropout: 0.0
datasets:
  - path: {data}
val_size: 0.25
training:
  objective: {objective}
  learning_rate: 1.0e-2
  max_steps: 4
  batch_size: 4
  max_length: 64
  warmup_steps: 0
  logging_steps: 1
  eval_strategy: steps
  eval_steps: 2
  save_steps: 2
  gradient_checkpointing: false
rl:
  num_generations: 4
  max_completion_length: 8
  rewards:
    - name: answer
    - name: length
      target: 3
      weight: 0.5
output_dir: {out}
"""


def rl_prompt_rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"fruit number {i % 9}?", "answer": FRUITS[i % 9]} for i in range(start, start + n)]


def tiny_llama_with_real_vocab(folder: Path, name: str = "llama-3.1") -> Path:
    """A tiny float32 Llama (hidden 64, 2 layers) on a real vocabulary, saved with the tokenizer and Llama 3's
    generation stops: a model llama.cpp's converter accepts."""
    from transformers import AutoTokenizer, GenerationConfig

    from lora_tune.quickstart.tiny import build_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir(name))
    build_tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=LLAMA3_STOPS).save_pretrained(folder)
    return folder


# Vision-language: tiny bases of two families built locally (tests/e2e/test_vision*.py, tests/unit/vision*)

VISION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% endif %}"
)
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square")
VISION_WORDS = "what colour is the shape in the picture? answer with one word. " + " ".join([*COLOURS, *SHAPES])
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)
]


def build_tiny_vlm(folder: Path, family: str = "llava", *, seed: int = 0) -> Path:
    """A random-init vision-language base of `family` (llava: CLIP tower + Llama; idefics3: SigLIP-style tower +
    Llama, SmolVLM's class) with its processor, 28x28 pictures: 4 image tokens (LLaVA) or 1 (Idefics3)."""
    import torch
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    tokenizer = build_tokenizer([CORPUS, VISION_WORDS] * 20, vocab_size=320)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"] if family == "llava" else IDEFICS3_TOKENS})
    tokenizer.chat_template = VISION_TEMPLATE
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    if family == "llava":
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        vision = CLIPVisionConfig(**tower, image_size=28, patch_size=14, projection_dim=32)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id)
        model = LlavaForConditionalGeneration(config)
        images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        processor = LlavaProcessor(
            image_processor=images, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=VISION_TEMPLATE, image_token="<image>",
        )  # fmt: skip
    elif family == "idefics3":
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        config = Idefics3Config(
            vision_config={**tower, "image_size": 28, "patch_size": 14}, text_config=text.to_dict(),
            image_token_id=image_id, scale_factor=2, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        model = Idefics3ForConditionalGeneration(config)
        images = Idefics3ImageProcessorPil(
            size={"longest_edge": 28}, max_image_size={"longest_edge": 28}, do_image_splitting=False
        )
        processor = Idefics3Processor(
            image_processor=images, tokenizer=tokenizer, image_seq_len=1, chat_template=VISION_TEMPLATE
        )
    else:
        raise ValueError(family)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def draw(colour: str, shape: str, *, size: int = 40, jitter: random.Random | None = None) -> Any:
    """A picture of one `shape` in `colour` on a grey ground (position and size jittered by `jitter`)."""
    from PIL import Image, ImageDraw

    rng = jitter or random.Random(0)
    image = Image.new("RGB", (size, size), (128, 128, 128))
    pen = ImageDraw.Draw(image)
    side = rng.randint(size // 2, size - 6)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x, y, x + side, y + side)
    (pen.ellipse if shape == "circle" else pen.rectangle)(box, fill=COLOURS[colour])
    return image


def colour_rows(folder: Path, n: int, seed: int, *, style: str = "messages") -> list[dict]:
    """`n` rows asking the colour of a drawn shape, each picture written to folder/images/ (paths relative to
    folder): OpenAI-style image parts (`messages`) or LLaVA-style `<image>` + `images` (`llava`)."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        name = f"images/s{seed}-{k}-{colour}-{shape}.png"
        draw(colour, shape, jitter=rng).save(folder / name)
        question = "what colour is the shape in the picture?"
        if style == "llava":
            rows.append(
                {
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": colour},
                    ],
                    "images": [name],
                }
            )
        else:
            content = [{"type": "image", "image": name}, {"type": "text", "text": question}]
            rows.append({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": colour}]})
    return rows


VISION_RECIPE = """\
model:
  name: {model}
  dtype: float32
quantization:
  bits: 4
adapter:
  r: 8
  alpha: 16
  dropout: 0.0
vision:
  train_projector: {projector}
datasets:
  - path: {data}
training:
  max_steps: {steps}
  batch_size: 4
  learning_rate: {lr}
  max_length: 64
  logging_steps: 1
  save_steps: {save_steps}
  seed: 0
output_dir: {out}
"""


def write_vision_recipe(
    root: Path, model: Path, data: Path, *, steps: int = 4, lr: float = 2e-3, **extra: Any
) -> Path:
    text = VISION_RECIPE.format(
        model=model,
        data=data,
        steps=steps,
        lr=lr,
        out=root / "run",
        projector=str(extra.pop("projector", False)).lower(),
        save_steps=extra.pop("save_steps", 1000),
    )
    recipe = yaml.safe_load(text)
    for key, value in extra.items():
        section, _, name = key.partition("__")
        if name:
            recipe.setdefault(section, {})[name] = value
        else:
            recipe[section] = value
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def pretrain_colour_words(folder: Path, steps: int = 60, seed: int = 0) -> Path:
    """Teach a random tiny base (in place) the answer's form, not its content: text-only rows whose answer is a
    colour word drawn at random, so that the base answers with a colour but at chance (its frozen random lm_head
    could not learn through LoRA otherwise: ../shared/STACK-NOTES.md). No picture is shown in this pre-training."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokenizer = processor.tokenizer
    question = "what colour is the shape in the picture?"
    for _ in range(steps):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": question}, {"role": "assistant", "content": rng.choice(sorted(COLOURS))}],
                tokenize=False,
            )
            for _ in range(16)
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder
