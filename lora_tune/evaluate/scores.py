"""Scores of generated answers: classification metrics for label-style tasks, and perplexity. Pure Python.

Free text is mapped to a label set first (`map_to_label`): an answer equal to a label after normalisation is that
label; otherwise, when exactly one label occurs in it as a whole word or phrase ("The answer is positive."), that
one; anything else is `OTHER`, a column of its own in the confusion matrix that counts against recall and never as
a correct prediction. Precision, recall and F1 follow the usual definitions per class, with 0 where a denominator is
0 (a class never predicted has precision 0); the macro average is the unweighted mean over the label set.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_tune.data.masking import IGNORE_INDEX, tokenize_batch
from lora_tune.inference.answers import Message

# What normalised exact match forgives at the end of an answer (normalize_answer).
TRAILING_PUNCTUATION = string.punctuation + "。．！？、"

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


OTHER = "(other)"
MAX_INFERRED_LABELS = 20


def infer_labels(references: Sequence[str]) -> list[str] | None:
    """The label set when the references look like one: 2-20 distinct answers, each seen twice on average.

    Labels keep the spelling of their first occurrence and are ordered by first occurrence; answers that differ
    only by case, spacing or trailing punctuation are one label. None when the references look like free text.
    """
    first: dict[str, str] = {}
    for reference in references:
        first.setdefault(normalize_answer(reference), reference.strip())
    distinct = len(first)
    if not 2 <= distinct <= MAX_INFERRED_LABELS or distinct * 2 > len(references):
        return None
    return list(first.values())


def map_to_label(answer: str, labels: Sequence[str]) -> str:
    """The label `answer` names (see the module docstring), or OTHER."""
    normalized = normalize_answer(answer)
    by_norm = {normalize_answer(label): label for label in labels}
    if normalized in by_norm:
        return by_norm[normalized]
    found = [
        label for norm, label in by_norm.items() if norm and re.search(rf"(?<!\w){re.escape(norm)}(?!\w)", normalized)
    ]
    return found[0] if len(found) == 1 else OTHER


@dataclass
class ClassScores:
    """Precision, recall, F1 and support of one label."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ClassificationReport:
    labels: list[str]
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_class: dict[str, ClassScores]
    # rows: true label (in `labels` order); columns: predicted label, `labels` then OTHER when anything was.
    confusion_columns: list[str] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "accuracy": self.accuracy,
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "per_class": {k: vars(v) for k, v in self.per_class.items()},
            "confusion": {
                "rows_true": self.labels,
                "columns_predicted": self.confusion_columns,
                "counts": self.confusion,
            },
        }


def classification_scores(
    predicted: Sequence[str], true: Sequence[str], labels: Sequence[str]
) -> ClassificationReport:
    """Scores of `predicted` labels against `true` labels; every true label must be in `labels`."""
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} predictions for {len(true)} references")
    unknown = sorted(set(true) - set(labels))
    if unknown:
        raise ValueError(f"reference label {unknown[0]!r} is not in the label set {list(labels)}")
    pairs = Counter(zip(true, predicted, strict=True))
    per_class: dict[str, ClassScores] = {}
    for label in labels:
        tp = pairs[(label, label)]
        predicted_as = sum(n for (_, p), n in pairs.items() if p == label)
        support = sum(n for (t, _), n in pairs.items() if t == label)
        precision = _ratio(tp, predicted_as)
        recall = _ratio(tp, support)
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class[label] = ClassScores(precision, recall, f1, support)
    columns = [*labels, OTHER] if any(p not in labels for p in predicted) else list(labels)
    confusion = [
        [sum(n for (t, p), n in pairs.items() if t == row and _column(p, labels) == col) for col in columns]
        for row in labels
    ]
    count = len(labels)
    return ClassificationReport(
        labels=list(labels),
        accuracy=_ratio(sum(p == t for p, t in zip(predicted, true, strict=True)), len(true)),
        macro_precision=sum(c.precision for c in per_class.values()) / count if count else 0.0,
        macro_recall=sum(c.recall for c in per_class.values()) / count if count else 0.0,
        macro_f1=sum(c.f1 for c in per_class.values()) / count if count else 0.0,
        per_class=per_class,
        confusion_columns=columns,
        confusion=confusion,
    )


def _column(predicted: str, labels: Sequence[str]) -> str:
    return predicted if predicted in labels else OTHER


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def perplexity_from_nll(total_nll: float, tokens: int) -> float | None:
    """Token-level perplexity: exp(total negative log-likelihood in nats / scored tokens); None for no tokens."""
    if tokens <= 0:
        return None
    try:
        return math.exp(total_nll / tokens)
    except OverflowError:
        return math.inf


def reference_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the assistant tokens of each conversation, and their count.

    The conversations are tokenized as training tokenizes them (chat template, assistant-only labels, end-of-turn
    token included), right-padded per batch, and scored with teacher forcing.
    """
    import torch

    examples = tokenize_batch(list(conversations), tokenizer, max_length, train_on="assistant")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in chunk], device=device)
            mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in chunk])
            labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in chunk], device=device)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask.to(device)).logits.float()
            targets = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += nll.item()
            count += int((targets != IGNORE_INDEX).sum().item())
    finally:
        model.train(was_training)
    return total, count


def normalize_answer(text: str) -> str:
    """Casefolded, whitespace collapsed, surrounding whitespace and trailing punctuation removed."""
    text = re.sub(r"\s+", " ", text).strip().casefold()
    return text.rstrip(TRAILING_PUNCTUATION).rstrip()


def answer_part(text: str) -> str:
    """What a reply answers, without its reasoning: the text after the last `</think>` (reasoning models write their
    thinking first), or the whole reply."""
    return text.rsplit("</think>", 1)[-1].strip() if "</think>" in text else text


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The fraction of predictions equal to their reference, character for character (0.0 for no items)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def normalized_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """`exact_match` after `normalize_answer` on both sides."""
    return exact_match([normalize_answer(p) for p in predictions], [normalize_answer(r) for r in references])
