"""The offline quickstart: a made-up world, a tiny base model pre-trained on it, and an instruction task about it.

The world is a list of invented countries, each with an invented capital city. The pre-training corpus states
these facts in prose (`The capital of Boleia is "Bitra".`); the supervised fine-tuning (SFT) data asks about
them in a chat (`What is the capital of Boleia?` -> `Bitra`). The SFT splits partition the countries, so a test
question is about a country the fine-tuned model never saw a question about: it can answer only with what the
base learnt in pre-training. The base itself has never seen a chat turn, so it does not answer in that form.

Capitals are quoted in the corpus on purpose. The byte-level tokenizer glues a word to the space before it, so
`is Bitra` and a chat answer `Bitra` (which follows a newline) would spell the name with different tokens, and a
fact learnt in one spelling is not available in the other. After a quote the name is tokenized as at the start
of a line, so the answer reuses exactly the tokens the base learnt the fact with.

Everything is seeded: every user gets the same world, corpus and splits (`SEED`), and, on the same kind of CPU
with the same thread count, the same base model (`build_base`'s `seed` varies only the initialisation and batches).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tune.quickstart import tiny
from lora_tune.run.locks import held
from lora_tune.run.outputs import (
    BUILD_MARKER,
    OutputError,
    OutputKind,
    is_empty,
    make_build_dir,
    make_dir,
    record,
    refuse_foreign,
    remove_leftovers,
    replace_dir_atomic,
    write_text_atomic,
)

SEED = 0
NUM_COUNTRIES = 250
# Countries per SFT split; what is left of NUM_COUNTRIES is in no split.
SPLIT_SIZES = {"train": 130, "valid": 20, "test": 100}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "tr", "st", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_COUNTRY_ENDINGS = ("ia", "land", "stan", "ora", "ary")
_CITY_ENDINGS = ("", "n", "r", "s", "th")

# How the pre-training corpus states a fact: always country first, then capital (a model learns a fact in the
# direction it reads it), in a few phrasings, none of them a question.
CORPUS_TEMPLATES = (
    'The capital of {country} is "{capital}".',
    '{country} has its capital in "{capital}".',
    'In {country}, the capital city is "{capital}".',
    'The people of {country} call their capital "{capital}".',
)

# How the SFT data asks for it: the train split asks in every form, valid and test in the first only.
QUESTION_TEMPLATES = (
    "What is the capital of {country}?",
    "Name the capital city of {country}.",
    "Which city is the capital of {country}?",
)

# The base: model shape and pre-training schedule, about 65-85 s on two CPU cores. Measured (QLoRA r=8, 5 epochs):
# after 200 steps the base knew 84% of the test countries' capitals (prose completion) and the tuned model got 70%
# held-out exact match; after 300 steps, 100% and 94-98% over five seeds; 360 steps (98% on seeds 0 and 2) keep a
# margin for other CPUs, whose float rounding gives a slightly different base.
VOCAB_SIZE = 512
MODEL_SHAPE = {"hidden_size": 128, "num_layers": 4, "num_heads": 4}
PRETRAIN = {"steps": 360, "batch_size": 32, "seq_len": 64, "lr": 6e-3, "warmup_steps": 30, "weight_decay": 0.01}
NUM_DOCUMENTS = 4000
BASE_INFO = "quickstart-base.json"
BUILD_INFIX = ".building-"  # the base is built beside its folder, in .NAME.building-XXXXXXXX, then renamed into place
# The base's folder as an output folder (lora_tune.run.outputs): `overwrite` replaces it only when it holds nothing but
# what the build wrote.
BASE = OutputKind("quickstart base", "out_dir", ".lora-tune-base")


@dataclass(frozen=True)
class Fact:
    country: str
    capital: str


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS)


def make_world(num_countries: int = NUM_COUNTRIES, seed: int = SEED) -> list[Fact]:
    """`num_countries` invented countries with their invented capitals.

    No name (country or city) is a prefix of another, so an answer cut short (`Vube` for `Vubeth`) is never a name.
    """
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(endings: tuple[str, ...]) -> str:
        while True:
            name = (_syllable(rng) + _syllable(rng) + rng.choice(endings)).capitalize()
            if not any(name.startswith(other) or other.startswith(name) for other in used):
                used.add(name)
                return name

    facts = []
    for _ in range(num_countries):
        country = fresh(_COUNTRY_ENDINGS)
        facts.append(Fact(country, fresh(_CITY_ENDINGS)))
    return facts


def pretraining_corpus(
    facts: list[Fact],
    *,
    num_documents: int = NUM_DOCUMENTS,
    sentences_per_document: tuple[int, int] = (2, 6),
    seed: int = SEED,
) -> list[str]:
    """Documents of a few fact sentences each, facts and phrasings drawn at random (with a fixed seed)."""
    rng = random.Random(seed + 1)
    documents = []
    for _ in range(num_documents):
        chosen = rng.sample(facts, rng.randint(*sentences_per_document))
        documents.append(
            " ".join(rng.choice(CORPUS_TEMPLATES).format(country=f.country, capital=f.capital) for f in chosen)
        )
    return documents


def split_world(facts: list[Fact], seed: int = SEED) -> dict[str, list[Fact]]:
    """Partition the countries into the SFT splits (`SPLIT_SIZES`): no country is in two splits."""
    if sum(SPLIT_SIZES.values()) > len(facts):
        raise ValueError(f"{len(facts)} countries are too few for splits of {SPLIT_SIZES}")
    shuffled = list(facts)
    random.Random(seed + 2).shuffle(shuffled)
    splits, start = {}, 0
    for name, size in SPLIT_SIZES.items():
        splits[name] = shuffled[start : start + size]
        start += size
    return splits


def sft_rows(facts: list[Fact], *, all_questions: bool) -> list[dict[str, str]]:
    """Alpaca rows asking for each country's capital: in every form of `QUESTION_TEMPLATES`, or the first only."""
    templates = QUESTION_TEMPLATES if all_questions else QUESTION_TEMPLATES[:1]
    return [
        {"instruction": template.format(country=fact.country), "input": "", "output": fact.capital}
        for fact in facts
        for template in templates
    ]


def sft_splits(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """The SFT rows of each split: `train`, `valid`, `test`."""
    splits = split_world(make_world(seed=seed), seed=seed)
    return {name: sft_rows(facts, all_questions=name == "train") for name, facts in splits.items()}


def write_sft_data(directory: str | Path, seed: int = SEED) -> dict[str, Path]:
    """Write `train.jsonl`, `valid.jsonl` and `test.jsonl` (alpaca rows) into `directory`; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in sft_splits(seed).items():
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        paths[name] = path
    return paths


def build_base(
    out_dir: str | Path,
    *,
    steps: int | None = None,
    seed: int = SEED,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Build the quickstart's base model into `out_dir` (returned): tokenizer, tiny Llama, pre-training, saving.

    The tokenizer is trained on the pre-training corpus and carries `tiny.CHAT_TEMPLATE`; the folder loads with
    `AutoTokenizer.from_pretrained` and `AutoModelForCausalLM.from_pretrained` (safetensors weights, generation
    config with the end-of-turn token as EOS). `steps` overrides `PRETRAIN["steps"]`. The folder is built next
    to `out_dir` and renamed into place, so an interrupted build leaves no half-written base. `seed` seeds the
    initialisation and the batches; the world and the corpus are always those of the shipped SFT data. `BASE_INFO`
    in the folder records the build. An existing base is replaced only with `overwrite`, and only when it holds
    nothing but what a build wrote.
    """
    out_dir = Path(out_dir)
    refuse_foreign(out_dir, BASE)  # a folder with anything but an earlier base in it: before a minute of work
    if out_dir.exists() and not is_empty(out_dir) and not overwrite:
        raise OutputError("out_dir", f"'{out_dir}' holds a quickstart base already; overwrite=True rebuilds it")
    started = time.perf_counter()
    facts = make_world()  # always the world of the shipped SFT data; `seed` varies the model's run only
    corpus = pretraining_corpus(facts)
    tokenizer = tiny.build_tokenizer(corpus, vocab_size=VOCAB_SIZE)
    model = tiny.build_tiny_llama(tokenizer, **MODEL_SHAPE, seed=seed)
    schedule: dict[str, Any] = {**PRETRAIN, "steps": steps if steps is not None else PRETRAIN["steps"]}
    losses = tiny.pretrain(model, tokenizer, corpus, **schedule, seed=seed, progress=progress)

    make_dir(out_dir.parent, "out_dir")
    with held(out_dir.parent / f".{out_dir.name}.build.lock", "out_dir", out_dir):
        refuse_foreign(out_dir, BASE)  # again, under the lock
        building = f".{out_dir.name}{BUILD_INFIX}"
        remove_leftovers(out_dir.parent, lambda name: name.startswith(building), f"base build to '{out_dir}'")
        staging = make_build_dir(out_dir.parent, f".{out_dir.name}{BUILD_INFIX}")
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            info = _build_record(seed, facts, corpus, tokenizer, model, schedule, losses, started)
            write_text_atomic(staging / BASE_INFO, json.dumps(info, indent=1) + "\n")
            record(staging, BASE, [entry.name for entry in staging.iterdir() if entry.name != BUILD_MARKER])
            replace_dir_atomic(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return out_dir


def _build_record(
    seed: int, facts: Any, corpus: list[str], tokenizer: Any, model: Any, schedule: dict, losses: list, started: float
) -> dict[str, Any]:
    """BASE_INFO: how the base was built, and its pre-training loss."""
    import torch

    return {
        "seed": seed,
        "countries": len(facts),
        "documents": len(corpus),
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": MODEL_SHAPE,
        "pretraining": schedule,
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "loss_every_25_steps": [round(loss, 3) for loss in losses[::25]],
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def is_quickstart_base(folder: str | Path) -> bool:
    """A base `build_base` wrote: its marker, or (built before the marker) its build record."""
    folder = Path(folder)
    return (folder / BASE.marker).is_file() or (folder / BASE_INFO).is_file()


def read_base_info(path: str | Path) -> dict[str, Any]:
    """The build record `build_base` wrote into a base folder."""
    return json.loads((Path(path) / BASE_INFO).read_text(encoding="utf-8"))
