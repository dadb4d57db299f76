"""Data preparation throughput: lora-tune's tokenize-and-mask against TRL's own SFT preparation, same data, same run.

    .venv/bin/python scripts/bench_data.py                # 100k synthetic multi-turn conversations
    .venv/bin/python scripts/bench_data.py --rows 2000    # a quick smoke run

Both sides start from the same in-memory `datasets.Dataset` of `messages` conversations (a system prompt and one to
three user/assistant exchanges) and produce `input_ids` + `labels` truncated to --max-length:
- lora-tune: `masking.tokenize_dataset` (chat template rendered per conversation, one batched fast-tokenizer call per
  1,000 rows, `num_proc` workers), as the pipeline runs it; the whole pipeline `build_datasets` from a .jsonl file
  (read, convert, drop empty turns and duplicates, shuffle, tokenize; caching off); and the per-row loop
  (`tokenize_conversation`) for scale;
- TRL: `SFTTrainer._prepare_dataset` with its defaults (full-sequence loss) and with `assistant_only_loss=True`
  (the same masking as lora-tune), `dataset_num_proc` workers.
Prints examples/s and tokens/s of each, the ratios, and whether the assistant-only outputs agree token for token.
The tokenizer is a byte-level BPE trained here (no hub); the chat template is the built-in chatml.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
import warnings
from types import SimpleNamespace

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # datasets' worker processes tokenize in parallel
warnings.filterwarnings("ignore", category=FutureWarning)

WORDS = (
    "the a model data train token answer question river mountain city number colour blue green red quick slow "
    "apple banana cherry seven twelve forty because however therefore compute result value table chair window "
    "language paris london tokyo music science history simple complex reason explain describe list write"
).split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = [{"role": "system", "content": sentence(rng, 4, 12)}]
        for _ in range(rng.randint(1, 3)):
            turns.append({"role": "user", "content": sentence(rng, 5, 30)})
            turns.append({"role": "assistant", "content": sentence(rng, 5, 60)})
        out.append(turns)
    return out


def build_tokenizer():
    from lora_tune.model.chat_template import apply_chat_template_choice
    from lora_tune.quickstart.tiny import build_tokenizer as tiny_tokenizer

    corpus = [" ".join(m["content"] for m in c) for c in conversations(2000, seed=1)]
    tokenizer = tiny_tokenizer(corpus, vocab_size=2048)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    apply_chat_template_choice(tokenizer, "chatml", "bench")
    return tokenizer


def whole_pipeline(data, tokenizer, args):
    """build_datasets on the conversations written to a .jsonl file, as `train` runs it."""
    import json
    import tempfile
    from pathlib import Path

    from lora_tune.data import build_datasets
    from lora_tune.recipe.schema import Recipe

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in data), encoding="utf-8")
        recipe = Recipe(
            model={"name": "bench"},
            datasets=[{"path": str(path)}],
            training={"max_length": args.max_length},
            data={"num_proc": args.num_proc},
            output_dir=tmp,
        )
        return build_datasets(recipe, tokenizer).datasets["train"]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--loop-rows", type=int, default=5000, help="rows for the per-row loop (it is slow)")
    args = parser.parse_args()

    import datasets
    import tokenizers
    import transformers
    import trl
    from trl import SFTConfig, SFTTrainer

    from lora_tune.data.masking import tokenize_conversation, tokenize_dataset

    datasets.disable_caching()  # time the work, not a cache hit
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    num_proc = args.num_proc if args.num_proc > 1 else None
    tokenizer = build_tokenizer()
    data = conversations(args.rows)
    dataset = datasets.Dataset.from_dict({"messages": data})
    print(
        f"{args.rows:,} conversations, max_length {args.max_length}, num_proc {args.num_proc}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus; datasets {datasets.__version__}, "
        f"tokenizers {tokenizers.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    )

    ours, ours_s = timed(lambda: tokenize_dataset(dataset, tokenizer, args.max_length, num_proc=num_proc))
    pipeline, pipeline_s = timed(lambda: whole_pipeline(data, tokenizer, args))
    loop_rows = min(args.loop_rows, args.rows)
    _, loop_s = timed(lambda: [tokenize_conversation(c, tokenizer, args.max_length) for c in data[:loop_rows]])

    def trl_prepare(assistant_only: bool):
        config = SFTConfig(
            output_dir="/tmp/bench-data-trl",
            max_length=args.max_length,
            assistant_only_loss=assistant_only,
            dataset_num_proc=num_proc,
            report_to="none",
            use_cpu=True,
            bf16=False,
        )
        # What SFTTrainer.__init__ sets before preparing data, without building a model.
        trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=False)
        return SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, config, False, None, "train")

    trl_default, trl_default_s = timed(lambda: trl_prepare(False))
    trl_masked, trl_masked_s = timed(lambda: trl_prepare(True))

    def tokens(ds) -> int:
        return sum(len(ids) for ids in ds["input_ids"])

    rows = [
        ("lora-tune tokenize_dataset (batched)", len(ours), ours_s, tokens(ours)),
        ("lora-tune build_datasets (jsonl -> tokens)", len(pipeline), pipeline_s, tokens(pipeline)),
        ("lora-tune per-row loop", loop_rows, loop_s, None),
        ("TRL _prepare_dataset, default (full loss)", len(trl_default), trl_default_s, tokens(trl_default)),
        ("TRL _prepare_dataset, assistant_only_loss", len(trl_masked), trl_masked_s, tokens(trl_masked)),
    ]
    print(f"{'':44} {'examples/s':>12} {'tokens/s':>12} {'seconds':>9}")
    for name, n, seconds, count in rows:
        tps = f"{count / seconds:12,.0f}" if count is not None else f"{'':12}"
        print(f"{name:44} {n / seconds:12,.0f} {tps} {seconds:9.2f}")
    ours_rate = len(ours) / ours_s
    print(f"ratio lora-tune batched / TRL default:            {ours_rate / (len(trl_default) / trl_default_s):.2f}x")
    print(f"ratio lora-tune batched / TRL assistant_only_loss: {ours_rate / (len(trl_masked) / trl_masked_s):.2f}x")
    print(f"ratio lora-tune batched / lora-tune per-row loop:  {ours_rate / (loop_rows / loop_s):.2f}x")
    pipeline_rate = len(pipeline) / pipeline_s
    trl_masked_rate = len(trl_masked) / trl_masked_s
    print(f"ratio lora-tune build_datasets / TRL assistant_only_loss: {pipeline_rate / trl_masked_rate:.2f}x")
    same_ids = ours["input_ids"] == trl_masked["input_ids"]
    same_labels = ours["labels"] == trl_masked["labels"]
    print(f"assistant-only outputs identical to TRL's: input_ids {same_ids}, labels {same_labels}")


if __name__ == "__main__":
    main()
