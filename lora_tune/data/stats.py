"""What the data pipeline kept and dropped, per split and per source: for the train log line and the preview."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SplitStats:
    """Counts for one split; token counts are over the examples kept (after truncation)."""

    rows: int  # examples kept (a plain text cut into pieces counts once per piece)
    dropped: int  # examples dropped because truncation left no assistant token
    truncated: int  # kept examples that were cut to max_length
    tokens: int
    trained_tokens: int
    too_long: int = 0  # examples dropped for being over max_length (data.too_long: drop)
    cut_texts: int = 0  # plain texts longer than max_length, cut into pieces (continued pretraining)
    text_pieces: int = 0  # the rows those texts became (included in `rows`)
    turn_rows: int = 0  # rows beyond a conversation's first, where a thinking template trains turn by turn

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def describe(self) -> str:
        text = f"{self.rows:,} rows, {self.tokens:,} tokens, {self.trained_share:.1%} trained"
        notes = [f"{self.truncated:,} truncated"] if self.truncated else []
        if self.turn_rows:
            notes.append(f"{self.turn_rows:,} more rows: conversations trained one assistant turn a row")
        if self.cut_texts:
            notes.append(f"{self.cut_texts:,} texts over max_length cut into {self.text_pieces:,} pieces")
        if self.dropped:
            notes.append(f"{self.dropped:,} dropped: no assistant token left")
        if self.too_long:
            notes.append(f"{self.too_long:,} dropped: over max_length")
        return text + (f" ({', '.join(notes)})" if notes else "")


@dataclass(frozen=True)
class SourceStats:
    split: str  # train / validation / test: where the source's rows go (before a ratio split)
    path: str
    rows: int  # rows read and converted
    bad_rows: int = 0


@dataclass(frozen=True)
class DropStats:
    """Examples removed before tokenizing, by reason."""

    bad_rows: int = 0
    bad_examples: tuple[str, ...] = ()  # the first few bad rows' errors
    empty: int = 0
    duplicates: int = 0
    held_out_duplicates: int = 0  # duplicates of a validation/test example removed from a more-trained split

    def describe(self) -> str:
        parts = []
        if self.bad_rows:
            parts.append(f"{self.bad_rows:,} bad rows ({'; '.join(self.bad_examples)})")
        if self.empty:
            parts.append(f"{self.empty:,} with an empty turn")
        if self.duplicates:
            parts.append(f"{self.duplicates:,} duplicates")
        if self.held_out_duplicates:
            parts.append(f"{self.held_out_duplicates:,} copies of held-out examples")
        return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class DataStats:
    train: SplitStats
    validation: SplitStats | None = None
    test_rows: int = 0
    sources: tuple[SourceStats, ...] = ()
    drops: DropStats = field(default_factory=DropStats)

    def summary(self) -> str:
        lines = [f"train: {self.train.describe()}"]
        if self.validation is not None:
            lines.append(f"validation: {self.validation.describe()}")
        if self.test_rows:
            lines.append(f"test: {self.test_rows:,} rows (saved as test.jsonl in the run directory)")
        lines.append(f"dropped before tokenizing: {self.drops.describe()}")
        return "\n".join(lines)
