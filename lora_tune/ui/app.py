"""The page: Recipe, Data, Train, Runs, Evaluate, Chat, Export, laid out with NiceGUI over the library.

Each tab calls what the command line calls: the recipe form is lora_tune.ui.form (the schema), validation is
`load_recipe`, the preview and the pre-flight check are `tasks.preview` / `tasks.check`, the plan is `plan_report`,
chat is `ChatSession`; training, eval, merge, export and push are the `lora-tune` commands in child processes
(lora_tune.ui.jobs). A failure shows the command's one line.
"""

from __future__ import annotations

import asyncio
import base64
import html
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nicegui import app, run, ui
from nicegui.elements.mixins.validation_element import ValidationElement

from lora_tune import tasks
from lora_tune.data.preview import ANSI_RESET, ANSI_TRAINED
from lora_tune.errors import LoraTuneError, RecipeError
from lora_tune.export.gguf import QUANTS
from lora_tune.inference.chat import ChatSession
from lora_tune.inference.load import load_for_inference
from lora_tune.plan.catalog import recipe_files
from lora_tune.plan.levers import plan_report
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import RunDir
from lora_tune.ui import form as recipe_form
from lora_tune.ui.jobs import LOG_FOLDER, Trainings, one_line_error, run_command
from lora_tune.ui.runs import CHART_KEYS, Pace, find_runs, format_seconds, read_metrics, run_info, series, total_steps

PASSWORD_ENV = "LORA_TUNE_UI_PASSWORD"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Settings:
    runs: Path
    cwd: Path
    catalog: Path | None


@dataclass
class State:
    """What one browser tab is working on."""

    text: str = ""
    source: Path | None = None  # the recipe file the text came from
    recipe: Recipe | None = None  # the text, validated
    error: RecipeError | None = None
    saved_text: str | None = None  # what the saved file holds
    saved_path: Path | None = None
    widgets: dict[str, Any] = field(default_factory=dict)
    syncing: bool = False


# ---- helpers -----------------------------------------------------------------------------------------------------


def ansi_to_html(text: str) -> str:
    """The preview's colours as HTML: its trained tokens (lora_tune.data.preview's bold green) in marked spans,
    any other escape sequence dropped."""
    parts = text.split(ANSI_TRAINED)
    out = [html.escape(ANSI.sub("", parts[0]))]
    for part in parts[1:]:
        trained, _, rest = part.partition(ANSI_RESET)
        out.append(f'<span class="trained" style="background:#c8f7c5">{html.escape(ANSI.sub("", trained))}</span>')
        out.append(html.escape(ANSI.sub("", rest)))
    return "".join(out)


def chart(title: str, names: list[str]) -> ui.echart:
    return ui.echart(
        {
            "title": {"text": title, "textStyle": {"fontSize": 13}},
            "animation": False,
            "tooltip": {"trigger": "axis"},
            "legend": {"top": 0, "right": 0},
            "grid": {"left": 50, "right": 10, "top": 30, "bottom": 25},
            "xAxis": {"type": "value", "name": "step", "minInterval": 1},
            "yAxis": {"type": "value", "scale": True},
            "series": [{"name": n, "type": "line", "showSymbol": True, "data": []} for n in names],
        }
    ).classes("w-full h-56")


def set_series(plot: ui.echart, data: list[list[tuple[int, float]]]) -> None:
    for serie, points in zip(plot.options["series"], data, strict=True):
        serie["data"] = [[step, value] for step, value in points]
    plot.update()


def mark(element: Any, name: str) -> Any:
    """A stable handle for tests and users' scripts: `data-testid` on the element's root."""
    element.props(f"data-testid={name}")
    return element


def error_box() -> ui.label:
    return ui.label("").classes("text-negative font-mono whitespace-pre-wrap")


def show_result(box: ui.label, ok: bool, text: str) -> None:
    box.text = text
    box.classes(replace="font-mono whitespace-pre-wrap " + ("text-positive" if ok else "text-negative"))


def set_error(widget: Any, message: str | None) -> None:
    """The error under a field (Quasar's error slot), or none."""
    if isinstance(widget, ValidationElement):
        widget.error = message
    elif message is not None or widget.props.get("error"):
        widget.props["error"] = message is not None
        widget.props["error-message"] = message


async def confirm(message: str) -> bool:
    with ui.dialog() as dialog, ui.card():
        ui.label(message)
        with ui.row():
            mark(ui.button("Yes, go on", on_click=lambda: dialog.submit(True)), "confirm-yes")
            ui.button("Cancel", on_click=lambda: dialog.submit(False)).props("flat")
    return bool(await dialog)


# ---- the page ----------------------------------------------------------------------------------------------------


def build_page(settings: Settings, trainings: Trainings) -> None:
    state = State()
    ui.page_title("lora-tune")
    with ui.header().classes("items-center py-1"):
        ui.label("lora-tune").classes("text-lg font-bold")
        ui.label(f"runs: {settings.runs}").classes("text-sm opacity-80")
    with ui.tabs().classes("w-full") as tabs:
        names = ["Recipe", "Data", "Train", "Runs", "Evaluate", "Chat", "Export"]
        tab = {name: mark(ui.tab(name), f"tab-{name.lower()}") for name in names}
    with ui.tab_panels(tabs, value=tab["Recipe"]).classes("w-full"):
        with ui.tab_panel(tab["Recipe"]):
            recipe_tab(settings, state)
        with ui.tab_panel(tab["Data"]):
            data_tab(state)
        with ui.tab_panel(tab["Train"]):
            train_tab(settings, state, trainings)
        with ui.tab_panel(tab["Runs"]):
            runs_tab(settings)
        with ui.tab_panel(tab["Evaluate"]):
            evaluate_tab(settings)
        with ui.tab_panel(tab["Chat"]):
            chat_tab(settings)
        with ui.tab_panel(tab["Export"]):
            export_tab(settings)


def run_choices(settings: Settings) -> dict[str, str]:
    """The runs under the folder, each by its path as typed on the command line (relative to where the UI runs)."""
    return {name: name for name in (_relative(run.root, settings.cwd) for run in find_runs(settings.runs))}


def _relative(path: Path, cwd: Path) -> str:
    try:
        return str(path.resolve().relative_to(cwd.resolve()))
    except ValueError:
        return str(path)


def run_picker(settings: Settings, label: str, name: str) -> ui.select:
    picker = mark(ui.select(run_choices(settings), label=label, with_input=True).classes("w-96"), name)

    def refresh() -> None:
        picker.set_options(run_choices(settings), value=picker.value)

    picker.on("focus", refresh)
    return picker


# ---- Recipe ------------------------------------------------------------------------------------------------------


def recipe_tab(settings: Settings, state: State) -> None:
    # The files only, named as `lora-tune recipes` names them: validating all of them (list_catalog) took 1.0 s of
    # every page load; the chosen one is validated when it loads, and a broken one says so there.
    files = recipe_files(settings.catalog) if settings.catalog else []
    catalog = {str(path): path.relative_to(settings.catalog).with_suffix("").as_posix() for path in files}
    with ui.row().classes("items-end w-full"):
        pick = mark(ui.select(catalog, label="catalog recipe", with_input=True).classes("w-80"), "catalog")
        path_input = mark(ui.input("or a recipe file").classes("w-96"), "recipe-path")
        load_button = mark(ui.button("Load"), "load-recipe")
    status = mark(error_box(), "recipe-status")
    fields = recipe_form.recipe_form()
    by_key = {f.key: f for section in fields.values() for f in section}

    with ui.row().classes("w-full no-wrap items-start"):
        with ui.scroll_area().classes("w-1/2 h-[36rem] border"):
            for section, section_fields in fields.items():
                with ui.expansion(section, value=section in ("model", "training")).classes("w-full"):
                    for spec in section_fields:
                        state.widgets[spec.key] = field_widget(spec, lambda key, value: on_field(key, value))
        with ui.column().classes("w-1/2"):
            yaml_box = mark(
                ui.textarea("recipe YAML", on_change=lambda e: on_yaml(e.value)).props("outlined autogrow"),
                "recipe-yaml",
            ).classes("w-full font-mono text-sm")
    with ui.row().classes("items-end"):
        gpu = mark(ui.input("GPU memory", value="24GiB").classes("w-32"), "gpu-memory")
        mark(ui.button("Plan", on_click=lambda: do_plan()), "plan")
        save_path = mark(ui.input("save as").classes("w-96"), "save-path")
        mark(ui.button("Save", on_click=lambda: do_save()), "save-recipe")
    plan_out = mark(ui.label("").classes("font-mono whitespace-pre text-xs"), "plan-output")

    def set_text(text: str) -> None:
        state.syncing = True
        try:
            yaml_box.value = text
        finally:
            state.syncing = False

    def fill_form(data: dict[str, Any]) -> None:
        state.syncing = True
        try:
            for key, widget in state.widgets.items():
                spec = by_key[key]
                present, value = recipe_form.get_value(data, key)
                widget.value = recipe_form.to_widget(spec, value if present else spec.default)
        finally:
            state.syncing = False

    def validate() -> None:
        display = str(state.saved_path or state.source or "recipe.yaml")
        state.recipe, state.error = recipe_form.validate_text(state.text, state.source, display)
        for widget in state.widgets.values():
            set_error(widget, None)
        if state.error is None:
            show_result(status, True, f"ok: valid recipe; output_dir {state.recipe.output_dir}")
            return
        show_result(status, False, "error: " + state.error.render())
        key = state.error.key or ""
        while key and key not in state.widgets:  # datasets.0.path -> datasets (the list's one field)
            key = key.rsplit(".", 1)[0] if "." in key else ""
        if key:
            set_error(state.widgets[key], state.error.render())

    def on_field(key: str, value: Any) -> None:
        if state.syncing:
            return
        spec = by_key[key]
        data = recipe_form.parse(state.text)
        try:
            parsed = recipe_form.from_widget(spec, value)
        except Exception as exc:  # noqa: BLE001 - a YAML line being typed: say so at the field
            set_error(state.widgets[key], f"{key}: not YAML: {str(exc).splitlines()[0]}")
            return
        present, _ = recipe_form.get_value(data, key)
        if parsed is None or (parsed == spec.default and not present):
            recipe_form.remove_value(data, key)
        else:
            recipe_form.set_value(data, key, parsed)
        state.text = recipe_form.dump(data)
        set_text(state.text)
        validate()

    def on_yaml(text: str) -> None:
        if state.syncing:
            return
        state.text = text
        try:
            fill_form(recipe_form.parse(text))
        except Exception:  # noqa: BLE001, S110 - half-typed YAML: the form waits, validation says what is wrong
            pass
        validate()

    def load(path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            show_result(status, False, f"error: {path}: {exc.strerror}")
            return
        state.source, state.text = path, text
        state.saved_path, state.saved_text = path, text
        save_path.value = _suggested_save(settings, path)
        set_text(text)
        fill_form(recipe_form.parse(text))
        validate()

    def do_load() -> None:
        chosen = path_input.value or pick.value
        if not chosen:
            show_result(status, False, "error: choose a catalog recipe or give a recipe file")
            return
        load(Path(chosen))

    load_button.on_click(do_load)
    pick.on_value_change(lambda e: e.value and load(Path(e.value)))

    async def do_plan() -> None:
        if state.recipe is None:
            show_result(status, False, "error: " + (state.error.render() if state.error else "load a recipe first"))
            return
        plan_out.text = "planning ..."
        try:
            plan_out.text = await run.io_bound(plan_report, state.recipe, gpu_memory=gpu.value or None)
        except LoraTuneError as exc:
            plan_out.text = f"error: {exc}"

    async def do_save() -> None:
        if not save_path.value:
            show_result(status, False, "error: save as: give a file name")
            return
        target = Path(save_path.value)
        if target.exists() and target.read_text(encoding="utf-8") != state.text:
            if not await confirm(f"{target} exists and differs: replace it with this recipe?"):
                return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(state.text, encoding="utf-8")
        state.saved_path, state.saved_text = target, state.text
        validate()
        if state.error is None:
            show_result(status, True, f"saved {target}; ok: valid recipe; output_dir {state.recipe.output_dir}")


def _suggested_save(settings: Settings, source: Path) -> str:
    """Where Save writes by default: the file itself when it is a user's, a copy under the runs folder when it is
    a catalog recipe (the catalog stays as shipped)."""
    if settings.catalog and source.resolve().is_relative_to(settings.catalog.resolve()):
        return _relative(settings.runs / "recipes" / source.name, settings.cwd)
    return str(source)


def field_widget(spec: recipe_form.FormField, changed: Callable[[str, Any], None]) -> Any:
    """One widget for one key: its label is the key, its hint the schema's description and default."""
    label = spec.key.split(".", 1)[-1] if "." in spec.key else spec.key
    hint = spec.help + ("" if spec.required else f" (default: {recipe_form.to_widget(spec, spec.default) or '-'})")

    def on_change(event: Any) -> None:
        changed(spec.key, event.value)

    if spec.kind == "bool":
        widget = ui.switch(label, on_change=on_change)
    elif spec.kind == "choice":
        options = {value: str(value) for value in spec.choices}
        if not spec.required and spec.default is None:
            options = {None: "(none)", **options}
        widget = ui.select(options, label=label, on_change=on_change).classes("w-full")
    elif spec.kind in ("int", "float"):
        widget = ui.number(label, on_change=on_change).classes("w-full")
    else:
        widget = ui.input(label, on_change=on_change).classes("w-full")
        widget.props("debounce=400")
    if isinstance(widget, ValidationElement):
        widget.without_auto_validation()  # the recipe's validation sets the error, not NiceGUI's own
    with widget:
        ui.tooltip(hint).classes("text-sm max-w-md")
    if spec.kind != "bool":
        widget.props["hint"] = spec.help[:110] + ("…" if len(spec.help) > 110 else "")
    return mark(widget, f"field-{spec.key}")


# ---- Data --------------------------------------------------------------------------------------------------------


def data_tab(state: State) -> None:
    ui.label("The recipe's data as training sees it: trained tokens highlighted; then the pre-flight check.")
    with ui.row():
        preview_button = mark(ui.button("Preview"), "preview")
        check_button = mark(ui.button("Check"), "check")
    status = mark(error_box(), "data-status")
    preview = mark(ui.html("").classes("font-mono whitespace-pre-wrap text-xs w-full"), "preview-output")
    report = mark(ui.label("").classes("font-mono whitespace-pre-wrap text-xs w-full"), "check-output")

    def recipe() -> Recipe | None:
        if state.recipe is None:
            show_result(status, False, "error: " + (state.error.render() if state.error else "load a recipe first"))
        return state.recipe

    async def do_preview() -> None:
        if (chosen := recipe()) is None:
            return
        show_result(status, True, "reading the data ...")
        try:
            text = await run.io_bound(tasks.preview, chosen, n=3, color=True)
        except LoraTuneError as exc:
            show_result(status, False, f"error: {exc}")
            return
        preview.content = ansi_to_html(text)
        show_result(status, True, "preview ready")

    async def do_check() -> None:
        if (chosen := recipe()) is None:
            return
        show_result(status, True, "checking ...")
        try:
            result = await run.io_bound(tasks.check, chosen)
        except LoraTuneError as exc:
            show_result(status, False, f"error: {exc}")
            return
        report.text = result.format()
        show_result(status, result.passed, "check passed" if result.passed else "check found problems (below)")

    preview_button.on_click(do_preview)
    check_button.on_click(do_check)


# ---- Train -------------------------------------------------------------------------------------------------------


def train_tab(settings: Settings, state: State, trainings: Trainings) -> None:
    with ui.row().classes("items-center"):
        start = mark(ui.button("Start", color="positive"), "start")
        resume = mark(ui.button("Resume"), "resume")
        stop = mark(ui.button("Stop", color="negative"), "stop")
        overwrite = mark(ui.checkbox("--overwrite (replace the run in output_dir)"), "overwrite")
    status = mark(error_box(), "train-status")
    watched = run_picker(settings, "run to watch", "watch-run")
    progress = mark(ui.linear_progress(value=0, show_value=False).classes("w-full"), "progress")
    progress_text = mark(ui.label(""), "progress-text")
    with ui.grid(columns=2).classes("w-full"):
        plots = {
            "loss": chart("loss", ["loss", "eval_loss"]),
            "learning_rate": chart("learning rate", ["learning_rate"]),
            "grad_norm": chart("grad norm", ["grad_norm"]),
            "reward": chart("reward (RL runs)", ["reward"]),
        }
    points = mark(ui.label(""), "chart-points")
    log = mark(ui.label("").classes("font-mono whitespace-pre text-xs w-full bg-gray-100 p-2"), "log-tail")
    pace = Pace()
    seen: dict[str, Any] = {"run": None}

    def output_dir() -> Path | None:
        if state.recipe is None:
            show_result(status, False, "error: " + (state.error.render() if state.error else "load a recipe first"))
            return None
        if state.saved_path is None or state.saved_text != state.text:
            show_result(status, False, "error: save the recipe first: a run trains a recipe file, as in a terminal")
            return None
        return Path(state.recipe.output_dir)

    async def begin(resuming: bool) -> None:
        run_dir = output_dir()
        if run_dir is None:
            return
        flag = overwrite.value and not resuming
        if flag and not await confirm(
            f"--overwrite: replace the run in {run_dir} (lora-tune removes only its own files there)?"
        ):
            return
        try:
            trainings.start(state.saved_path, run_dir, resume=resuming, overwrite=flag)
        except LoraTuneError as exc:
            show_result(status, False, f"error: {exc}")
            return
        show_result(status, True, f"{'resumed' if resuming else 'started'}: lora-tune train {state.saved_path}")
        name = _relative(settings.cwd / run_dir, settings.cwd)
        watched.set_options({**run_choices(settings), name: name}, value=name)

    async def do_stop() -> None:
        if not watched.value:
            show_result(status, False, "error: choose the run to stop")
            return
        pid = trainings.stop(Path(watched.value))
        if pid is None:
            show_result(status, False, f"error: no live run in {watched.value}")
        else:
            show_result(status, True, f"SIGTERM sent to pid {pid}: it writes a checkpoint and exits; Resume goes on")

    start.on_click(lambda: begin(False))
    resume.on_click(lambda: begin(True))
    stop.on_click(do_stop)

    def refresh() -> None:
        if not watched.value:
            return
        run_dir = Path(watched.value)
        if seen["run"] != watched.value:
            seen["run"] = watched.value
            pace.first = pace.last = None
        records = read_metrics(RunDir(run_dir).metrics)
        data = {key: series(records, key) for key in CHART_KEYS}
        set_series(plots["loss"], [data["loss"], data["eval_loss"]])
        for key in ("learning_rate", "grad_norm", "reward"):
            set_series(plots[key], [data[key]])
        info = run_info(RunDir(run_dir))
        tail = trainings.tail(run_dir)
        total = total_steps(RunDir(run_dir), tail)
        if info.step is not None:
            pace.see(info.step)
        done = info.step or 0
        progress.value = min(done / total, 1.0) if total else 0
        left = "" if info.status != "running" else f", time left {format_seconds(pace.seconds_left(total))}"
        progress_text.text = f"{info.status}: step {done}/{total or '?'}{left}"
        last = f", last loss {data['loss'][-1][1]:.4f} at step {data['loss'][-1][0]}" if data["loss"] else ""
        points.text = f"loss chart: {len(data['loss'])} points{last}"
        log.text = tail
        code = trainings.exit_code(run_dir)
        if code not in (None, 0) and info.status != "running":
            show_result(status, False, one_line_error(tail))

    ui.timer(1.0, refresh)


# ---- Runs --------------------------------------------------------------------------------------------------------


def runs_tab(settings: Settings) -> None:
    columns = [
        {"name": "run", "label": "run", "field": "run", "align": "left", "sortable": True},
        {"name": "status", "label": "status", "field": "status", "sortable": True},
        {"name": "step", "label": "steps", "field": "step"},
        {"name": "loss", "label": "train loss", "field": "loss"},
        {"name": "eval_loss", "label": "eval loss", "field": "eval_loss"},
        {"name": "minutes", "label": "minutes", "field": "minutes"},
        {"name": "updated", "label": "updated", "field": "updated", "sortable": True},
    ]
    table = mark(ui.table(columns=columns, rows=[], row_key="run").classes("w-full"), "runs-table")

    def figure(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    def refresh() -> None:
        rows = []
        for run_dir in find_runs(settings.runs):
            info = run_info(run_dir)
            wall = info.summary.get("wall_seconds")
            rows.append(
                {
                    "run": _relative(info.root, settings.cwd),
                    "status": info.status,
                    "step": info.step or "",
                    "loss": figure(info.loss),
                    "eval_loss": figure(info.eval_loss),
                    "minutes": "" if wall is None else f"{wall / 60:.1f}",
                    "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.updated)),
                }
            )
        table.rows = rows
        table.update()

    refresh()
    ui.timer(5.0, refresh)  # runs started elsewhere (a terminal) appear, live ones move on
    mark(ui.button("Refresh", on_click=refresh), "refresh-runs")
    ui.label("Compare the loss curves of two runs").classes("text-base mt-4")
    with ui.row():
        first = run_picker(settings, "run A", "compare-a")
        second = run_picker(settings, "run B", "compare-b")
    plot = chart("train loss", ["A", "B"])

    def compare() -> None:
        picked = [first.value, second.value]
        curves = [series(read_metrics(RunDir(Path(p)).metrics), "loss") if p else [] for p in picked]
        for serie, name in zip(plot.options["series"], picked, strict=True):
            serie["name"] = Path(name).name if name else "-"
        set_series(plot, curves)

    first.on_value_change(compare)
    second.on_value_change(compare)


# ---- Evaluate ----------------------------------------------------------------------------------------------------


def evaluate_tab(settings: Settings) -> None:
    ui.label("`lora-tune eval RUN --base`: the tuned model and its base side by side on held-out data.")
    with ui.row().classes("items-end"):
        picked = run_picker(settings, "run", "eval-run")
        data = mark(ui.input("data (.jsonl; empty: the run's test split)").classes("w-96"), "eval-data")
        limit = mark(ui.number("limit rows", value=None, min=1, precision=0).classes("w-32"), "eval-limit")
        button = mark(ui.button("Evaluate"), "evaluate")
    status = mark(error_box(), "eval-status")
    report = mark(ui.label("").classes("font-mono whitespace-pre text-xs w-full"), "eval-report")

    async def evaluate() -> None:
        if not picked.value:
            show_result(status, False, "error: choose a run")
            return
        args = ["eval", picked.value, "--base"]
        args += ["--data", data.value] if data.value else []
        args += ["--limit", str(int(limit.value))] if limit.value else []
        show_result(status, True, f"running lora-tune {' '.join(args)} ...")
        button.disable()
        result = await run_command(*args, cwd=settings.cwd)
        button.enable()
        if not result.ok:
            show_result(status, False, result.error)
            return
        show_result(status, True, "done: eval.json and eval.md written in the run")
        markdown = RunDir(Path(picked.value)).eval_markdown
        report.text = markdown.read_text(encoding="utf-8") if markdown.is_file() else result.output

    button.on_click(evaluate)


# ---- Chat --------------------------------------------------------------------------------------------------------


class Stream:
    """A file-like sink for ChatSession's streamer: the pieces, read by the page as they come."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, piece: str) -> int:
        self.text += piece
        return len(piece)

    def flush(self) -> None:
        pass


def chat_tab(settings: Settings) -> None:
    ui.label("The tuned model beside its base (the same weights with the adapter switched off), streaming.")
    with ui.row().classes("items-end"):
        picked = run_picker(settings, "run", "chat-run")
        load_button = mark(ui.button("Load"), "chat-load")
    status = mark(error_box(), "chat-status")
    with ui.row().classes("items-end w-full"):
        prompt = mark(ui.input("message").classes("w-2/3"), "chat-input")
        send = mark(ui.button("Send"), "chat-send")
    with ui.row().classes("w-full no-wrap items-start"):
        with ui.column().classes("w-1/2"):
            ui.label("tuned").classes("font-bold")
            tuned_box = mark(ui.column().classes("w-full"), "chat-tuned")
        with ui.column().classes("w-1/2"):
            ui.label("base").classes("font-bold")
            base_box = mark(ui.column().classes("w-full"), "chat-base")
    sessions: dict[str, ChatSession] = {}

    async def load() -> None:
        if not picked.value:
            show_result(status, False, "error: choose a finished run")
            return
        show_result(status, True, "loading ...")
        try:
            loaded = await run.io_bound(load_for_inference, picked.value)
        except LoraTuneError as exc:
            show_result(status, False, f"error: {exc}")
            return
        sessions.clear()
        sessions["tuned"] = ChatSession(loaded)
        sessions["base"] = ChatSession(loaded)
        tuned_box.clear()
        base_box.clear()
        has_base = hasattr(loaded.model, "disable_adapter")
        show_result(status, True, f"loaded {loaded.description}" + ("" if has_base else "; no base to compare"))

    async def answer(session: ChatSession, box: ui.column, text: str, base: bool) -> None:
        with box:
            ui.chat_message(text, name="you", sent=True)
            bubble = ui.chat_message(name="base" if base else "tuned")
            with bubble:
                label = mark(ui.label("").classes("whitespace-pre-wrap"), "answer-base" if base else "answer-tuned")
        sink = Stream()

        def generate() -> str:
            if base:
                with session.loaded.model.disable_adapter():
                    return session.ask(text, stream=sink)
            return session.ask(text, stream=sink)

        job = asyncio.ensure_future(run.io_bound(generate))
        while not job.done():
            label.text = sink.text
            await asyncio.sleep(0.1)
        try:
            label.text = job.result() or sink.text
        except LoraTuneError as exc:
            label.text = f"error: {exc}"

    async def do_send() -> None:
        if "tuned" not in sessions:
            show_result(status, False, "error: load a run first")
            return
        text = (prompt.value or "").strip()
        if not text:
            return
        prompt.value = ""
        send.disable()
        await answer(sessions["tuned"], tuned_box, text, base=False)
        if hasattr(sessions["base"].loaded.model, "disable_adapter"):
            await answer(sessions["base"], base_box, text, base=True)
        send.enable()

    load_button.on_click(load)
    send.on_click(do_send)
    prompt.on("keydown.enter", do_send)


# ---- Export ------------------------------------------------------------------------------------------------------


def export_tab(settings: Settings) -> None:
    picked = run_picker(settings, "run", "export-run")
    status = mark(error_box(), "export-status")
    output = mark(ui.label("").classes("font-mono whitespace-pre text-xs w-full"), "export-output")
    overwrite = mark(
        ui.checkbox("--overwrite (replace lora-tune's own files in the output folder)"), "export-overwrite"
    )

    async def go(args: list[str], what: str) -> bool:
        if overwrite.value and "--dry-run" not in args:
            if not await confirm(f"--overwrite: replace what an earlier {what} wrote in that folder?"):
                return False
            args = [*args, "--overwrite"]
        show_result(status, True, f"running lora-tune {' '.join(args)} ...")
        result = await run_command(*args, cwd=settings.cwd)
        output.text = result.output[-6000:]
        show_result(status, result.ok, f"{what}: done" if result.ok else result.error)
        return result.ok

    def need_run() -> str | None:
        if not picked.value:
            show_result(status, False, "error: choose a run")
        return picked.value

    ui.label("Merge: the adapter folded into its base, a standalone transformers folder").classes("mt-2 font-bold")
    with ui.row().classes("items-end"):
        merge_out = mark(ui.input("output folder (default RUN-merged)").classes("w-96"), "merge-output")

        async def merge() -> None:
            if run_dir := need_run():
                await go(["merge", run_dir, "--output", merge_out.value or f"{run_dir}-merged"], "merge")

        mark(ui.button("Merge", on_click=merge), "merge")

    ui.label("GGUF: for llama.cpp and Ollama").classes("mt-2 font-bold")
    with ui.row().classes("items-end"):
        quant = mark(ui.select(list(QUANTS), value="q8_0", label="quant").classes("w-32"), "gguf-quant")
        gguf_out = mark(ui.input("output folder (default RUN-gguf)").classes("w-96"), "gguf-output")

        async def gguf() -> None:
            if run_dir := need_run():
                args = ["export", run_dir, "--quant", quant.value]
                await go([*args, *(["--output", gguf_out.value] if gguf_out.value else [])], "GGUF export")

        mark(ui.button("Export GGUF", on_click=gguf), "gguf")

    ui.label(
        "Push to the hub: the files are listed first (--dry-run); the token comes from your environment or "
        "`hf auth login` and is never shown here"
    ).classes("mt-2 font-bold")
    with ui.row().classes("items-end"):
        folder = mark(ui.input("folder (a merged folder or the run; default the run)").classes("w-96"), "push-folder")
        repo = mark(ui.input("ORG/NAME").classes("w-64"), "push-repo")
        private = mark(ui.checkbox("private"), "push-private")
    listed: dict[str, Any] = {"what": None}

    def push_args() -> list[str] | None:
        run_dir = need_run()
        if run_dir is None:
            return None
        return ["push", folder.value or run_dir, repo.value or "", *(["--private"] if private.value else [])]

    async def dry_run() -> None:
        if (args := push_args()) is not None:
            listed["what"] = args if await go([*args, "--dry-run"], "push --dry-run") else None
            push_button.set_enabled(listed["what"] is not None)

    async def push() -> None:
        args = push_args()
        if args is None or args != listed["what"]:
            show_result(status, False, "error: list the files first (dry run) for this folder and repository")
            return
        if await confirm(f"Upload {args[1]} to {args[2]}?"):
            await go(args, "push")

    with ui.row():
        mark(ui.button("List files (dry run)", on_click=dry_run), "push-dry-run")
        push_button = mark(ui.button("Push", on_click=push), "push")
        push_button.disable()


# ---- serving the page --------------------------------------------------------------------------------------------


class PasswordGate:
    """HTTP basic authentication in front of the whole app (pages, assets and the websocket): any user name, the
    password given to `lora-tune ui`. Compared in constant time; the password is never logged."""

    def __init__(self, app: Any, password: str) -> None:
        self.app = app
        self.password = password.encode()

    def allowed(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:6].lower() == b"basic ":
                try:
                    _, _, given = base64.b64decode(value[6:]).partition(b":")
                except ValueError:
                    return False
                return secrets.compare_digest(given, self.password)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = [(b"www-authenticate", b'Basic realm="lora-tune"'), (b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b"lora-tune ui: password required\n"})


def check_bind(host: str, password: str | None) -> None:
    """Beyond this machine only with a password: the page starts training and uploads models."""
    if host not in LOOPBACK and not password:
        raise LoraTuneError(
            f"--host {host}: the page would be reachable from other machines; give a password with --auth or "
            f"{PASSWORD_ENV} (or keep the default 127.0.0.1)"
        )


def serve_ui(runs: Path, *, host: str, port: int, password: str | None, catalog: Path | None) -> int:
    check_bind(host, password)
    settings = Settings(runs=runs, cwd=Path.cwd(), catalog=catalog)
    trainings = Trainings(runs, settings.cwd)  # one per UI: every page sees the children it started
    runs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NICEGUI_STORAGE_PATH", str(runs / LOG_FOLDER / "nicegui"))  # not .nicegui/ in the cwd

    @ui.page("/")
    def index() -> None:
        build_page(settings, trainings)

    if password:
        app.add_middleware(PasswordGate, password=password)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    gate = "; password required (HTTP basic auth, any user name)" if password else " (this machine only)"
    print(f"lora-tune ui: {where}{gate}; runs under {runs}; Ctrl-C stops the page, not the runs", flush=True)
    ui.run(
        host=host,
        port=port,
        title="lora-tune",
        reload=False,
        show=False,
        show_welcome_message=False,
        on_air=None,
        favicon="🧪",
        storage_secret=None,
    )
    return 0
