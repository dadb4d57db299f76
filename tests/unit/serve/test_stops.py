"""Stop strings: the answer ends before the first one; nothing that may begin one is sent early."""

from __future__ import annotations

from lora_tune.serve.stops import StopCutter


def feed_all(cutter: StopCutter, text: str) -> list[str]:
    """Feed `text` one character at a time, as tokens arrive; the pieces sent, then the rest at the finish."""
    pieces = [cutter.feed(text[:n]) for n in range(1, len(text) + 1)]
    return [p for p in [*pieces, cutter.finish(text)] if p]


def test_without_stops_each_piece_goes_out_at_once() -> None:
    assert feed_all(StopCutter(), "abc") == ["a", "b", "c"]


def test_the_answer_ends_before_the_stop_string_and_nothing_of_it_is_sent() -> None:
    cutter = StopCutter(["###"])
    assert "".join(feed_all(cutter, "ab#c##d###tail")) == "ab#c##d"
    assert cutter.stopped


def test_a_possible_start_of_a_stop_is_held_back_until_it_is_known() -> None:
    cutter = StopCutter(["END"])
    assert cutter.feed("xE") == "x"  # "E" may begin "END"
    assert cutter.feed("xEN") == ""
    assert cutter.feed("xENx") == "ENx"  # it did not
    assert not cutter.stopped


def test_the_earliest_of_several_stops_wins() -> None:
    cutter = StopCutter(["zz", "b"])
    assert cutter.finish("aazzb") == "aa" and cutter.stopped


def test_half_a_character_waits_for_the_rest() -> None:
    cutter = StopCutter()
    assert cutter.feed("é\ufffd") == "é"
    assert cutter.feed("é€") == "€"


def test_held_back_text_that_never_became_a_stop_is_sent_at_the_end() -> None:
    cutter = StopCutter(["<end>"])
    assert cutter.feed("ok <en") == "ok "
    assert cutter.finish("ok <en") == "<en" and not cutter.stopped
