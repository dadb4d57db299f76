"""Step 1 of every run: the run folder opened (locked; refused when it holds another run or a user's files), the
point to start from (a fresh start, or the newest sealed checkpoint of a resumed run), and the run's record written
before anything else: the resolved recipe, the data fingerprint, the environment of this attempt.
"""

from __future__ import annotations

import logging
import sys

from lora_tune.recipe.load import dump_resolved
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import RunDir, prepare_run_dir, write_json_atomic, write_text_atomic
from lora_tune.run.provenance import environment, record_environment
from lora_tune.training.checkpoints import ResumePoint
from lora_tune.training.resume import data_fingerprint, plan_resume, wants_resume

log = logging.getLogger(__name__)


def open_run(
    recipe: Recipe,
    *,
    overwrite: bool,
    resume: bool,
    recipe_path: str | None = None,
    argv: list[str] | None = None,
    comment: str = "",
) -> tuple[RunDir, ResumePoint]:
    """Step 1 of every run: the run directory, where to start from, and the run's provenance written first.

    `resume` (the --resume flag) or `training.resume: auto` continue the run in output_dir when there is one.
    `comment` (YAML comment lines: how the run was launched) ends the resolved recipe.
    """
    resuming = wants_resume(recipe, resume=resume, overwrite=overwrite)
    run = prepare_run_dir(recipe.output_dir, overwrite=overwrite, resume=resuming, reads=recipe.local_sources)
    start = ResumePoint(None)
    if resuming and run.is_run():
        start = plan_resume(run, recipe)
    elif resume:
        log.info("resume: no run in %s yet; starting a new one", run.root)
    # The resolved recipe and the data identity first, so a crash at any later point is traceable and resumable.
    write_text_atomic(run.recipe, dump_resolved(recipe) + comment)
    if start.checkpoint is None:
        write_json_atomic(run.data_fingerprint, data_fingerprint(recipe))
    resumed = str(start.checkpoint) if start.checkpoint else None
    record_environment(run, environment(recipe_path, list(argv if argv is not None else sys.argv), resumed))
    return run, start
