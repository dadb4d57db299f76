"""`lora-tune ui` driven by a real headless Chromium (Debian's `chromium`, through Playwright) along the whole
journey: pick the quickstart recipe, see a planted bad value refused at its field, plan, preview and check the data,
start training and watch the chart grow, a second start refused by the lock, stop (a checkpoint), close the page,
resume, the runs list, evaluate, chat (the same answer as `lora-tune generate`), export q8_0, push's dry run.

The base is a tiny Llama on the real Llama 3 vocabulary saved where the quickstart recipe looks for its base
(runs/quickstart-base): the quickstart's own pre-trained base has a BPE vocabulary of its own, which llama.cpp's
converter refuses, so the GGUF step needs a vocabulary llama.cpp knows. Everything else is the quickstart as shipped
(its recipe, its data), with the steps cut down in the page's own form.

Screenshots of each step go to $LORA_TUNE_UI_SCREENSHOTS when it is set (docs/img/ui holds the committed ones),
else to the test's temporary folder. Without chromium the test skips, except under CI, where it fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, require_llama_cpp, tiny_llama_with_real_vocab

CHROMIUM = Path(os.environ.get("LORA_TUNE_CHROMIUM", "/usr/bin/chromium"))
STEPS = 30
pytestmark = pytest.mark.slow


def browser_or_skip():  # noqa: ANN201 - playwright's sync API
    if not CHROMIUM.is_file():
        if os.environ.get("CI"):
            raise AssertionError(f"{CHROMIUM} is missing: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    return sync_playwright


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(cwd: Path, port: int, log: Path) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-m", "lora_tune", "ui", "--runs", "runs", "--port", str(port)],
        cwd=cwd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},  # NiceGUI's own test mode
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert child.poll() is None, log.read_text()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
            return child
        except OSError:
            time.sleep(0.5)
    child.kill()
    raise AssertionError(f"the UI did not answer in 120 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory as a user's: the catalog beside it (recipes/), the quickstart's base in runs/."""
    require_llama_cpp()
    cwd = tmp_path_factory.mktemp("ui")
    (cwd / "recipes").symlink_to(ROOT / "recipes", target_is_directory=True)
    tiny_llama_with_real_vocab(cwd / "runs" / "quickstart-base")
    return cwd


class Journey:
    def __init__(self, page, shots: Path) -> None:  # noqa: ANN001 - a playwright Page
        self.page, self.shots, self.count = page, shots, 0

    def el(self, testid: str):  # noqa: ANN201
        return self.page.locator(f"[data-testid='{testid}']")

    def field(self, key: str):  # noqa: ANN201 - the Quasar field around a recipe key's input (label, value, error)
        return self.page.locator(f"label:has([data-testid='field-{key}'])")

    def tab(self, name: str) -> None:
        self.el(f"tab-{name}").click()

    def choose(self, testid: str, option: str) -> None:
        """Pick from a select by typing into its filter (long lists scroll virtually: unshown options are absent)."""
        self.el(testid).click()
        self.el(testid).fill(option)
        self.page.get_by_role("option", name=option, exact=True).click()

    def text(self, testid: str) -> str:
        return self.el(testid).inner_text()

    def wait_text(self, testid: str, needle: str, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.text(testid)
            if needle in text:
                return text
            self.page.wait_for_timeout(250)
        raise AssertionError(f"{testid}: {needle!r} did not appear in {timeout_s} s; it says {self.text(testid)!r}")

    def until(self, ok, what: str, timeout_s: float = 30) -> None:  # noqa: ANN001 - a predicate
        deadline = time.monotonic() + timeout_s
        while not ok():
            assert time.monotonic() < deadline, f"{what}: not seen in {timeout_s} s"
            self.page.wait_for_timeout(200)

    def points(self) -> int:
        text = self.text("chart-points")
        return int(text.split(":")[1].split()[0]) if ":" in text else 0

    def wait_points(self, at_least: int, timeout_s: float) -> int:
        """Until the loss chart holds `at_least` points (a loaded machine can show several new ones at once)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (n := self.points()) >= at_least:
                return n
            self.page.wait_for_timeout(250)
        raise AssertionError(f"the loss chart did not reach {at_least} points in {timeout_s} s: {self.points()}")

    def shot(self, name: str) -> None:
        self.count += 1
        self.page.screenshot(path=str(self.shots / f"{self.count:02d}-{name}.png"))


def test_journey_in_a_real_browser(workspace: Path, tmp_path: Path) -> None:
    sync_playwright = browser_or_skip()
    shots = Path(os.environ.get("LORA_TUNE_UI_SCREENSHOTS", tmp_path / "shots")).resolve()
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ui = start_ui(workspace, port, tmp_path / "ui.log")
    run_dir = workspace / "runs" / "quickstart"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            j = Journey(page, shots)

            # Recipe: the catalog's quickstart, the form and the YAML side by side.
            j.choose("catalog", "quickstart")
            j.wait_text("recipe-status", "ok: valid recipe")
            assert j.el("field-training.learning_rate").input_value() == "0.003"
            j.shot("recipe")

            # A planted bad value, typed in the form: refused at its field with the CLI's line; the YAML follows.
            j.el("field-training.learning_rate").fill("-1")
            j.el("field-training.learning_rate").blur()
            j.wait_text("recipe-status", "training.learning_rate: expected greater than 0")
            refused = "training.learning_rate: expected greater than 0"
            j.until(lambda: refused in j.field("training.learning_rate").inner_text(), "the error at the field")
            assert "learning_rate: -1" in j.el("recipe-yaml").input_value()
            j.shot("refused-at-field")

            # The run cut down, typed in the YAML: the form follows it. A small learning rate keeps the tuned model
            # near its base, so that chat has words to compare (30 steps at 3e-3 teach it to end its turn at once).
            data = yaml.safe_load(j.el("recipe-yaml").input_value())
            data["training"].update(
                learning_rate=0.0003, max_steps=STEPS, logging_steps=1, batch_size=2, max_length=64,
                eval_strategy="no", save_strategy="no", warmup_steps=2,
            )  # fmt: skip
            j.el("recipe-yaml").fill(yaml.safe_dump(data, sort_keys=False))
            j.wait_text("recipe-status", "ok: valid recipe")
            assert j.el("field-training.max_steps").input_value() == str(STEPS)
            j.until(lambda: refused not in j.field("training.learning_rate").inner_text(), "the error gone")

            # Plan for a chosen GPU memory, then save (a copy under runs/: the catalog stays as shipped).
            j.el("gpu-memory").fill("8GiB")
            j.el("plan").click()
            assert "8" in j.wait_text("plan-output", "GiB", timeout_s=120)
            assert j.el("save-path").input_value() == "runs/recipes/quickstart.yaml"
            j.el("save-recipe").click()
            j.wait_text("recipe-status", "saved runs/recipes/quickstart.yaml")
            saved = yaml.safe_load((workspace / "runs/recipes/quickstart.yaml").read_text())
            assert saved["training"]["max_steps"] == STEPS and saved["training"]["learning_rate"] == 0.0003

            # Data: the preview with the trained tokens marked, and the pre-flight check's findings.
            j.tab("data")
            j.el("preview").click()
            j.wait_text("data-status", "preview ready", timeout_s=180)
            assert j.el("preview-output").locator("span.trained").count() > 0
            j.el("check").click()
            j.wait_text("data-status", "check passed", timeout_s=180)
            assert "checks passed" in j.text("check-output")
            j.shot("data")

            # Train: start, the chart grows, a second start is refused by the run's lock.
            j.tab("train")
            started = time.monotonic()
            j.el("start").click()
            j.wait_text("train-status", "started")
            j.wait_points(1, timeout_s=300)
            first_point = time.monotonic() - started
            print(f"start -> first chart point: {first_point:.1f} s")
            assert j.wait_points(3, timeout_s=300) < STEPS, "the run ended before the page could stop it"
            j.el("start").click()
            j.wait_text("train-status", "is in use by another lora-tune process")
            assert "running: step" in j.text("progress-text")
            j.shot("training")

            # Stop: SIGTERM, the run writes a checkpoint and exits before its last step.
            j.el("stop").click()
            j.wait_text("train-status", "SIGTERM sent")
            stopped = j.wait_text("progress-text", "stopped: step", timeout_s=300)
            assert f"/{STEPS}" in stopped and int(stopped.split("step ")[1].split("/")[0]) < STEPS
            assert any(p.name.startswith("checkpoint-") for p in (run_dir / "checkpoints").iterdir())
            j.shot("stopped")

            # Close the page; a new one finds the run from its folder. Resume runs it to the end.
            page.close()
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            j.page = page
            j.el("recipe-path").fill("runs/recipes/quickstart.yaml")
            j.el("load-recipe").click()
            j.wait_text("recipe-status", "ok: valid recipe")
            j.tab("train")
            j.choose("watch-run", "runs/quickstart")
            j.wait_text("progress-text", "stopped: step")
            points_before = j.points()
            j.el("resume").click()
            j.wait_text("train-status", "resumed")
            j.wait_text("progress-text", f"finished: step {STEPS}/{STEPS}", timeout_s=600)
            assert j.points() >= points_before
            assert (run_dir / "summary.json").is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()
            j.shot("finished")

            # Runs: the run with its status and figures; two loss curves compared.
            j.tab("runs")
            j.el("refresh-runs").click()
            row = page.locator("[data-testid='runs-table'] tr", has_text="runs/quickstart").first
            j.until(lambda: "finished" in row.inner_text(), "the run listed as finished")
            assert f"finished\t{STEPS}\t" in row.inner_text()
            j.choose("compare-a", "runs/quickstart")
            page.keyboard.press("Escape")
            j.shot("runs")

            # Evaluate: base vs tuned, the command's report.
            j.tab("evaluate")
            j.choose("eval-run", "runs/quickstart")
            j.el("eval-data").fill("recipes/data/quickstart/test.jsonl")
            j.el("eval-limit").fill("4")
            j.el("evaluate").click()
            j.wait_text("eval-status", "done", timeout_s=600)
            report = j.text("eval-report")
            assert "base" in report.lower() and (run_dir / "eval.json").is_file()
            j.shot("evaluate")

            # Chat: the tuned answer is the one `lora-tune generate` gives; the base answers beside it.
            j.tab("chat")
            j.choose("chat-run", "runs/quickstart")
            j.el("chat-load").click()
            j.wait_text("chat-status", "loaded", timeout_s=300)
            question = "What is the capital of Velmora?"
            j.el("chat-input").fill(question)
            j.el("chat-send").click()
            j.el("answer-base").wait_for(timeout=300_000)
            j.until(lambda: not j.el("chat-send").is_disabled(), "both answers", timeout_s=300)
            tuned = j.text("answer-tuned")
            terminal = subprocess.run(
                [sys.executable, "-m", "lora_tune", "generate", "runs/quickstart", question, "--no-stream"],
                cwd=workspace, capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            assert terminal.returncode == 0, terminal.stderr
            assert tuned.strip() and tuned.split() == terminal.stdout.split()  # HTML folds the spacing
            j.shot("chat")

            # Export: GGUF q8_0, read back by the export itself; push lists its files first.
            j.tab("export")
            j.choose("export-run", "runs/quickstart")
            j.el("gguf").click()
            j.wait_text("export-status", "GGUF export: done", timeout_s=600)
            gguf = list((workspace / "runs" / "quickstart-gguf").glob("*Q8_0.gguf"))
            assert len(gguf) == 1 and gguf[0].read_bytes()[:4] == b"GGUF"
            j.shot("export")
            assert j.el("push").is_disabled()
            j.el("push-repo").fill("someone/quickstart-lora")
            j.el("push-dry-run").click()
            j.wait_text("export-status", "push --dry-run: done", timeout_s=120)
            assert "adapter_model.safetensors" in j.text("export-output")
            assert not j.el("push").is_disabled()
            j.shot("push-dry-run")
            browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)


def test_a_second_page_after_restart_lists_the_same_runs(workspace: Path, tmp_path: Path) -> None:
    """The UI restarted: the runs are found again from their folders (nothing was kept in the UI's memory)."""
    sync_playwright = browser_or_skip()
    if not (workspace / "runs" / "quickstart" / "summary.json").is_file():
        pytest.skip("needs the journey's run")
    port = free_port()
    ui = start_ui(workspace, port, tmp_path / "ui.log")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("[data-testid='tab-runs']").click()
            row = page.locator("[data-testid='runs-table'] tr", has_text="runs/quickstart").first
            row.wait_for()
            assert "finished" in row.inner_text()
            browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)
