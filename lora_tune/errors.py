"""User-facing errors: each renders as one line that names where the problem is and what was expected."""

from __future__ import annotations

ECHO_LIMIT = 80  # characters of a user's value quoted in an error line
LINE_LIMIT = 1000  # characters of a whole message: one error, one line, never more than a screen


def shorten(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` as an error line may quote it: cut to `limit` characters with an ellipsis and the original length
    when longer (a 4 MB value must not make a 4 MB error line), and line breaks and other control characters
    escaped, so it stays one line."""
    flat = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return flat if len(text) <= limit else f"{flat}… ({len(text):,} characters)"


class LoraTuneError(Exception):
    """Base class of errors that the CLI prints as one line (exit code 2), without a traceback."""

    exit_code = 2


class OptionError(LoraTuneError):
    """A value given to a library function is refused. `option` is the function's parameter ("quant", "output");
    the error reads "quant: expected one of ...", and the command line names the flag that set it instead
    ("--quant: expected one of ...").
    """

    def __init__(self, option: str, message: str):
        self.option = option
        self.message = message
        super().__init__(self.render(option))

    def __reduce__(self):  # two arguments, not the one line: rebuild from them when pickled across processes
        return type(self), (self.option, self.message)

    def render(self, name: str) -> str:
        """The line, naming the value `name`: the parameter in the library, the flag on the command line."""
        return f"{name}: {self.message}"


class RecipeError(LoraTuneError):
    """A recipe is invalid: names the file, the line when known, the key path and what was expected."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, key: str | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        super().__init__(self.render())

    def render(self) -> str:
        where = self.file or "<recipe>"
        if self.line is not None:
            where += f":{self.line}"
        key = f" {shorten(self.key)}:" if self.key else ""
        return f"{where}:{key} {shorten(self.message, LINE_LIMIT)}"


class DataError(LoraTuneError):
    """A dataset row is unusable: names the file, the row or line (1-based) and the field."""

    def __init__(
        self,
        message: str,
        *,
        file: str,
        row: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ):
        self.message = message
        self.file = file
        self.row = row
        self.field = field
        self.line = line
        super().__init__(self.render())

    def __reduce__(self):  # keyword-only arguments: rebuild from them when pickled across processes
        return _rebuild_data_error, (self.message, self.file, self.row, self.field, self.line)

    def render(self) -> str:
        where = self.file
        if self.line is not None:
            where += f": line {self.line}"
        if self.row is not None:
            where += f": row {self.row}"
        if self.field:
            where += f": field '{self.field}'"
        return f"{where}: {self.message}"


def _rebuild_data_error(message: str, file: str, row: int | None, field: str | None, line: int | None) -> DataError:
    return DataError(message, file=file, row=row, field=field, line=line)


class FieldError(ValueError):
    """A cross-field check failed; `key` is the path (relative to the section) the message is about.

    The recipe loader reads `key` to point at the right line of the YAML file.
    """

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class ModelLoadError(LoraTuneError):
    """The base model or tokenizer cannot be loaded (missing folder, offline, gated, no safetensors)."""


class MethodError(LoraTuneError):
    """The recipe's method cannot run on what it points at (e.g. init_from names no adapter)."""
