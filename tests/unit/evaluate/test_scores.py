"""Classification metrics, label mapping and perplexity on hand-made predictions with hand-computed expectations."""

from __future__ import annotations

import math

import pytest

from lora_tune.evaluate.scores import OTHER, classification_scores, infer_labels, map_to_label, perplexity_from_nll

LABELS = ["pos", "neg", "neu"]


def test_three_classes_with_an_unmapped_answer() -> None:
    true = ["pos", "pos", "pos", "neg", "neg", "neu"]
    predicted = ["pos", "neg", "pos", "neg", OTHER, "pos"]
    report = classification_scores(predicted, true, LABELS)
    assert report.accuracy == pytest.approx(3 / 6)
    # pos: 2 right of 3 predicted as pos (one was neu) and of 3 true pos.
    assert vars(report.per_class["pos"]) == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    # neg: 1 right of 2 predicted as neg and of 2 true neg (the other went to OTHER).
    assert vars(report.per_class["neg"]) == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2}
    )
    # neu: never predicted: precision, recall and F1 are 0.
    assert vars(report.per_class["neu"]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report.macro_precision == pytest.approx(7 / 18)
    assert report.macro_recall == pytest.approx(7 / 18)
    assert report.macro_f1 == pytest.approx(7 / 18)
    assert report.confusion_columns == ["pos", "neg", "neu", OTHER]
    assert report.confusion == [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0]]


def test_precision_and_recall_differ() -> None:
    report = classification_scores(["a", "b", "b", "b"], ["a", "a", "a", "b"], ["a", "b"])
    assert report.accuracy == 0.5
    a, b = report.per_class["a"], report.per_class["b"]
    assert (a.precision, a.recall, a.f1) == pytest.approx((1.0, 1 / 3, 0.5))  # F1 = 2 * 1 * 1/3 / (4/3)
    assert (b.precision, b.recall, b.f1) == pytest.approx((1 / 3, 1.0, 0.5))
    assert (report.macro_precision, report.macro_recall, report.macro_f1) == pytest.approx((2 / 3, 2 / 3, 0.5))
    assert report.confusion_columns == ["a", "b"]  # nothing unmapped: no OTHER column
    assert report.confusion == [[1, 2], [0, 1]]


def test_perfect_predictions() -> None:
    report = classification_scores(["x", "y"], ["x", "y"], ["x", "y"])
    assert (report.accuracy, report.macro_precision, report.macro_recall, report.macro_f1) == (1.0, 1.0, 1.0, 1.0)


def test_reference_outside_the_label_set_is_refused() -> None:
    with pytest.raises(ValueError, match="reference label 'maybe' is not in the label set"):
        classification_scores(["yes"], ["maybe"], ["yes", "no"])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        classification_scores(["yes", "no"], ["yes"], ["yes", "no"])


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("pos", "pos"),
        ("  POS. ", "pos"),  # normalised equality
        ("The answer is neg", "neg"),  # exactly one label inside as a word
        ("pos or neg", OTHER),  # two labels named: ambiguous
        ("positive", OTHER),  # 'pos' only as part of a word
        ("", OTHER),
    ],
)
def test_map_to_label(answer: str, expected: str) -> None:
    assert map_to_label(answer, LABELS) == expected


def test_infer_labels() -> None:
    assert infer_labels(["yes", "no", "Yes", "no."]) == ["yes", "no"]  # first spelling kept, in order seen
    assert infer_labels(["Paris", "Rome", "Oslo"]) is None  # every answer distinct: free text
    assert infer_labels(["yes"] * 5) is None  # one class is no classification
    assert infer_labels([f"label{i % 21}" for i in range(100)]) is None  # more than 20 labels


def test_perplexity_from_nll() -> None:
    assert perplexity_from_nll(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert perplexity_from_nll(0.0, 3) == 1.0
    assert perplexity_from_nll(5.0, 0) is None
    assert perplexity_from_nll(1e6, 1) == math.inf


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ("<think>\nParis or Lyon? Paris.\n</think>\n\nParis", "Paris"),
        ("<think></think>Paris", "Paris"),
        ("Paris", "Paris"),  # no reasoning: the reply is the answer, untouched
        (" Paris ", " Paris "),
    ],
)
def test_a_reasoning_reply_is_scored_on_its_answer(reply: str, answer: str):
    from lora_tune.evaluate.scores import answer_part, exact_match

    assert answer_part(reply) == answer
    expected = answer_part("<think>x</think>\nParis")
    assert exact_match([answer_part(reply)], [expected]) == float(answer == "Paris")
