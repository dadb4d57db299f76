"""The offline quickstart: a made-up world, a tiny base model pre-trained on it, and an instruction task about it.

The world is a list of invented countries, each with an invented capital city. The pre-training corpus states
these facts in prose ("The capital of Zorvia is Quellan."); the supervised fine-tuning (SFT) data asks about them
in a chat ("What is the capital of Zorvia?" -> "Quellan"). The SFT splits partition the countries, so a test
question is about a country the fine-tuned model never saw a question about; it can answer only by using what the
base learnt in pre-training. The base itself has never seen a chat turn, so it cannot answer in the expected form.

Everything here is deterministic in `seed`: every user builds the same world, corpus, splits and (on the same
machine and thread count) the same base model.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 0
NUM_COUNTRIES = 400
SPLIT_SIZES = {"train": 240, "valid": 40, "test": 120}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "tr", "st", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_COUNTRY_ENDINGS = ("ia", "land", "stan", "ora", "ary")
_CITY_ENDINGS = ("", "n", "r", "s", "th")

CORPUS_TEMPLATES = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
    "{country} has its capital in {capital}.",
    "In {country}, the capital city is {capital}.",
)

# Question forms of the SFT data; the training split uses all of them, valid and test the first.
QUESTION_TEMPLATES = (
    "What is the capital of {country}?",
    "Name the capital city of {country}.",
    "Which city is the capital of {country}?",
)


@dataclass(frozen=True)
class Fact:
    country: str
    capital: str


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS)


def make_world(num_countries: int = NUM_COUNTRIES, seed: int = SEED) -> list[Fact]:
    """`num_countries` invented countries, each with its own invented capital; all names distinct."""
    rng = random.Random(seed)
    used: set[str] = set()
    facts: list[Fact] = []

    def fresh(make) -> str:
        while True:
            name = make().capitalize()
            if name not in used:
                used.add(name)
                return name

    while len(facts) < num_countries:
        country = fresh(lambda: _syllable(rng) + _syllable(rng) + rng.choice(_COUNTRY_ENDINGS))
        capital = fresh(lambda: _syllable(rng) + _syllable(rng) + rng.choice(_CITY_ENDINGS))
        facts.append(Fact(country, capital))
    return facts


def pretraining_corpus(
    facts: list[Fact], *, num_documents: int = 4000, sentences_per_document: tuple[int, int] = (2, 6), seed: int = SEED
) -> list[str]:
    """Documents of a few random fact sentences each, every fact in every phrasing of `CORPUS_TEMPLATES`."""
    rng = random.Random(seed + 1)
    documents = []
    for _ in range(num_documents):
        n = rng.randint(*sentences_per_document)
        sentences = [
            rng.choice(CORPUS_TEMPLATES).format(country=fact.country, capital=fact.capital)
            for fact in rng.sample(facts, n)
        ]
        documents.append(" ".join(sentences))
    return documents


def split_world(facts: list[Fact], seed: int = SEED) -> dict[str, list[Fact]]:
    """Partition the countries into the SFT splits: no country is in two splits."""
    rng = random.Random(seed + 2)
    shuffled = list(facts)
    rng.shuffle(shuffled)
    out: dict[str, list[Fact]] = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        out[name] = shuffled[start : start + size]
        start += size
    return out


def sft_rows(facts: list[Fact], *, all_templates: bool) -> list[dict[str, str]]:
    """Alpaca rows asking for the capital of each country."""
    templates = QUESTION_TEMPLATES if all_templates else QUESTION_TEMPLATES[:1]
    return [
        {"instruction": template.format(country=fact.country), "input": "", "output": fact.capital}
        for fact in facts
        for template in templates
    ]


def sft_splits(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    splits = split_world(make_world(seed=seed), seed=seed)
    return {name: sft_rows(facts, all_templates=name == "train") for name, facts in splits.items()}


def write_sft_data(directory: str | Path, seed: int = SEED) -> dict[str, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in sft_splits(seed).items():
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        paths[name] = path
    return paths
