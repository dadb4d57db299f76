"""What the pre-flight check found: one result per check, the whole report as text and JSON, and its one-liners.

Pure Python: importing this module loads no ML library.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from lora_tune.errors import LoraTuneError

Status = Literal["pass", "warn", "fail"]


@dataclass(frozen=True)
class CheckResult:
    """One check: what it verified (pass) or what it found against what it expected, and the recipe change to fix it.

    `count` rows were affected; `file` and `row` (1-based, as in data errors) name the first of them.
    """

    name: str
    status: Status
    message: str
    fix: str | None = None
    count: int = 0
    file: str | None = None
    row: int | None = None

    def line(self) -> str:
        """One line: the check, the example, what was found and expected, and the fix."""
        where = ""
        if self.file is not None:
            where = f"{self.file}" + (f" row {self.row}" if self.row is not None else "")
            where += f" (and {self.count - 1} more row{'s' if self.count > 2 else ''})" if self.count > 1 else ""
            where += ": "
        fix = f"; fix: {self.fix}" if self.fix and self.status != "pass" else ""
        return f"{self.name}: {where}{self.message}{fix}"


@dataclass(frozen=True)
class MarkedExample:
    """One training example as the model sees it, with its trained tokens wrapped in [[...]]."""

    file: str
    row: int
    text: str
    truncated: bool


@dataclass
class PreflightReport:
    """Everything `lora-tune check` prints and `train` writes to `preflight.json` in the run directory."""

    checks: list[CheckResult]
    rows: int
    sources: dict[str, dict[str, int]]  # dataset path -> {"rows": in the dataset, "checked": sampled}
    tokens: int  # over the examples training keeps, after max_length
    trained_tokens: int
    stop_tokens: list[str]  # the tokens that close assistant turns in the rendered examples
    generation_stop_tokens: list[str] | None  # the generation config's eos_token_id(s), None when unknown
    generation_config: str  # where those came from
    chat_template_sha256: str
    example: MarkedExample | None = None
    max_length: int | None = None
    longest_example: int = 0
    online: bool = False  # an online RL run: what is trained is sampled during training, not in the data

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "warn"]

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def summary(self) -> str:
        """One line, e.g. `pre-flight: 9 checks passed on 500 rows; 23.4% of tokens trained; stop token ...`."""
        rows = f"{self.rows:,} row{'s' if self.rows != 1 else ''}"
        if self.failures:
            names = ", ".join(c.name for c in self.failures)
            return f"pre-flight: {_plural(len(self.failures), 'check')} failed ({names}) on {rows}"
        passed = len(self.checks) - len(self.warnings)
        text = f"pre-flight: {_plural(passed, 'check')} passed"
        if self.warnings:
            text += f", {_plural(len(self.warnings), 'warning')} ({', '.join(c.name for c in self.warnings)})"
        if self.online:
            stops = " / ".join(self.stop_tokens) or "nothing"
            return f"{text} on {self.rows:,} training prompts; completions are sampled in training, stop at {stops}"
        text += f" on {rows}; {self.trained_share:.1%} of tokens trained"
        if self.stop_tokens:
            tokens = " / ".join(self.stop_tokens)
            text += f"; stop token{'s' if len(self.stop_tokens) > 1 else ''} {tokens} trained in every assistant turn"
        return text

    def failure_lines(self) -> list[str]:
        return [c.line() for c in self.failures]

    def format(self) -> str:
        """The full report as text: every check, the numbers, and one example with its trained tokens marked."""
        sources = ", ".join(f"{path} ({n['checked']:,} of {n['rows']:,} rows)" for path, n in self.sources.items())
        generation = ", ".join(self.generation_stop_tokens) if self.generation_stop_tokens is not None else "unknown"
        lines = [
            f"data: {sources}",
            f"chat template sha256: {self.chat_template_sha256}",
            f"stop tokens: template ends assistant turns with {', '.join(self.stop_tokens) or 'none found'}; "
            f"generation stops on {generation} ({self.generation_config})",
            f"trained tokens: {self.trained_tokens:,} of {self.tokens:,} ({self.trained_share:.1%}); "
            f"longest example {self.longest_example:,} tokens (max_length {self.max_length})",
            "",
        ]
        if self.online:
            lines[1:4] = [
                f"stop tokens: generation stops on {generation} ({self.generation_config})",
                f"prompt tokens: {self.tokens:,}; longest prompt + completion {self.longest_example:,} tokens "
                f"(max_length {self.max_length})",
            ]
        width = max(len(c.name) for c in self.checks)
        for check in self.checks:
            detail = check.line().removeprefix(f"{check.name}: ")
            lines.append(f"{check.status.upper():4}  {check.name:<{width}}  {detail}")
        if self.example is not None:
            cut = ", cut to max_length" if self.example.truncated else ""
            lines += ["", f"example ({self.example.file} row {self.example.row}{cut}; trained tokens in [[...]]):"]
            lines += ["  " + line for line in self.example.text.splitlines() or [""]]
        lines += ["", self.summary()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["summary"] = self.summary()
        data["trained_share"] = round(self.trained_share, 4)
        for check, result in zip(data["checks"], self.checks, strict=True):
            check["line"] = result.line()
        return data


class PreflightError(LoraTuneError):
    """A pre-flight check failed and the recipe does not ask to train anyway; the message has one line per failure."""

    def __init__(self, report: PreflightReport, report_path: str | None = None):
        self.report = report
        where = f"; full report: {report_path}" if report_path else ""
        head = (
            f"pre-flight check failed on the recipe's data ({_plural(len(report.failures), 'check')}{where}); "
            "set preflight.on_failure: warn to train anyway"
        )
        super().__init__("\n".join([head, *("  " + line for line in report.failure_lines())]))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"
