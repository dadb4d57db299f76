"""lora_tune.run.secrets: the stream the CLI prints through (secrets that arrive in pieces), JSON masking, and the
saved login's token."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from lora_tune.run.secrets import HOLD_LIMIT, RedactingStream, redact, redact_json
from tests.helpers import TOKEN


def written(pieces: list[str], *, release: bool = True) -> tuple[str, list[str]]:
    """What reaches the target when `pieces` are written one by one, each flushed; and the target after each."""
    target = io.StringIO()
    stream = RedactingStream(target)
    seen = []
    for piece in pieces:
        stream.write(piece)
        stream.flush()
        seen.append(target.getvalue())
    if release:
        stream.release()
    return target.getvalue(), seen


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.mark.parametrize("size", [1, 3, 7])
def test_a_secret_written_a_few_characters_at_a_time_never_reaches_the_target(size: int):
    text = f"key {TOKEN} and https://alice:PA55word@example.org/x and hf_{'a' * 30}.\n"
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    out, seen = written(pieces)
    assert out == "key hf_*** and https://***@example.org/x and hf_***.\n"
    assert not any("PA55" in s or TOKEN[:12] in s or "hf_aaaa" in s for s in seen)


def test_text_without_spaces_still_streams():
    """Chinese or Japanese output has no spaces: each character goes out as it comes, not at the end of the line."""
    _, seen = written(["今天", "天气", "很好"], release=False)
    assert seen == ["今天", "今天天气", "今天天气很好"]


def test_words_go_out_at_the_next_space_and_the_rest_on_release():
    out, seen = written(["one tw", "o thr", "ee"])
    assert seen == ["one ", "one two ", "one two "] and out == "one two three"


def test_a_url_with_a_non_ascii_password_is_held_whole():
    out, seen = written(["https://用户:", "密码", "@host/x done"])
    assert seen[:2] == ["", ""] and out == "https://***@host/x done"


def test_a_known_value_with_a_space_is_masked_whole(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORA_TUNE_API_KEY", "two words secret")
    out, seen = written(["key: two ", "words ", "secret\n"])
    assert seen[:2] == ["", ""] and out == "key: hf_***\n"


def test_a_word_longer_than_the_hold_limit_goes_out(monkeypatch: pytest.MonkeyPatch):
    _, seen = written(["x" * (HOLD_LIMIT + 1)], release=False)
    assert len(seen[0]) == HOLD_LIMIT + 1


def test_after_release_writes_go_out_whole():
    target = io.StringIO()
    stream = RedactingStream(target)
    stream.release()
    stream.write(f"late {TOKEN}")
    assert target.getvalue() == "late hf_***"


def test_json_is_masked_string_by_string():
    """Text masking could match across two strings of compact JSON ("a://b","c@d") and break it."""
    data = {"base_model": f"/models/{TOKEN}/x", "urls": ["a://b", "c@d"], f"k-{TOKEN}": 1}
    masked = redact_json(json.loads(json.dumps(data, separators=(",", ":"))))
    assert masked == {"base_model": "/models/hf_***/x", "urls": ["a://b", "c@d"], "k-hf_***": 1}


def test_the_saved_login_is_masked_while_hf_token_names_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """huggingface_hub's get_token() returns HF_TOKEN when it is set, never the token `hf auth login` saved."""
    import huggingface_hub.constants

    saved = "a-saved-login-token-0123"
    (tmp_path / "token").write_text(saved + "\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    assert redact(f"path/{saved}/x") == "path/hf_***/x"


def test_a_write_from_a_signal_handler_inside_a_write_does_not_deadlock():
    """Python runs a signal handler between two bytecodes of the main thread, also inside RedactingStream.write;
    training's handler writes to stderr. Simulated: the target's write re-enters the stream once."""
    import threading

    class Interrupting(io.StringIO):
        stream: RedactingStream | None = None

        def write(self, text: str) -> int:
            stream, self.stream = self.stream, None
            if stream is not None:
                stream.write(f"SIGTERM {TOKEN}: stopping\n")
            return super().write(text)

    target = Interrupting()
    stream = target.stream = RedactingStream(target)
    done = threading.Thread(target=lambda: (stream.write("first line\nhalf a wo"), stream.release()), daemon=True)
    done.start()
    done.join(timeout=5)
    assert not done.is_alive(), "deadlocked"
    assert target.getvalue() == "SIGTERM hf_***: stopping\nfirst line\nhalf a wo"
