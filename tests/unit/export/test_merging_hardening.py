"""`lora-tune merge` under pressure: one merge at a time per destination, what killed merges left beside it is
removed, and no card lora-tune writes carries a credential that a recipe value holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_tune.cli import main
from lora_tune.export import merge
from lora_tune.run.locks import LockedError, acquire, release
from lora_tune.run.outputs import BUILD_MARKER
from tests.helpers import lora, make_run

# The lock a merge takes: beside the destination, since the destination is replaced whole by a rename.
HOLDER = """
import sys, time
from pathlib import Path
from lora_tune.run.locks import acquire
for path in sys.argv[1:]:
    acquire(Path(path), "test holder", Path(path).parent)
print("locked", flush=True)
time.sleep(60)
"""


def hold_in_another_process(*locks: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, locks)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_merge_to_a_live_destination_refuses_in_one_line(tiny_model_dir: Path, tmp_path: Path, capsys):
    run = make_run(tmp_path, tiny_model_dir, lora())
    out, fresh = tmp_path / "merged", tmp_path / "fresh"
    assert main(["merge", str(run), "--output", str(out), "--no-verify"]) == 0  # the previous export
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder = hold_in_another_process(tmp_path / ".merged.merge.lock", tmp_path / ".fresh.merge.lock")
    try:
        capsys.readouterr()
        for dest, flags in ((out, ["--overwrite"]), (fresh, [])):
            assert main(["merge", str(run), "--output", str(dest), "--no-verify", *flags]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert f"--output '{dest}' is in use by another lora-tune process (pid {holder.pid} on " in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert not fresh.exists()
        assert not [p.name for p in tmp_path.iterdir() if ".merge-" in p.name], "no build folder was started"
    finally:
        holder.kill()
        holder.wait()
    assert main(["merge", str(run), "--output", str(out), "--overwrite", "--no-verify"]) == 0  # the holder is gone
    assert (out / "config.json").is_file()


def test_the_destination_stays_locked_while_the_merge_builds_and_is_let_go_after(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
):
    import lora_tune.export.merging as merge_module

    run = make_run(tmp_path, tiny_model_dir, lora())
    out = tmp_path / "merged"
    lock = tmp_path / ".merged.merge.lock"
    real_write = merge_module.write_shard
    seen = []

    def check_locked(path: Path, specs: dict, tensors) -> int:  # noqa: ANN001 - an iterator
        with pytest.raises(LockedError, match=r"in use by another lora-tune process \(pid \d+ on "):
            acquire(lock, "output", out)  # a second descriptor conflicts with the merge's, as another process's
        seen.append(path.name)
        return real_write(path, specs, tensors)

    monkeypatch.setattr(merge_module, "write_shard", check_locked)
    merge(run, out, verify=False)
    assert seen, "the merge wrote shards under the lock"
    assert lock.read_text() == "", "released cleanly (the empty file stays, as locks.release explains)"
    release(acquire(lock, "output", out))  # free after the merge

    def interrupted(*args) -> int:  # noqa: ANN002
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_module, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge(run, out, overwrite=True, verify=False)
    release(acquire(lock, "output", out))  # and after a failed one


def test_leftovers_of_killed_merges_to_the_destination_are_removed_and_nothing_else(
    tiny_model_dir: Path, tmp_path: Path, capsys
):
    run = make_run(tmp_path, tiny_model_dir, lora())
    parent = tmp_path / "exports"
    dest = parent / "DEST"
    assert main(["merge", str(run), "--output", str(dest), "--no-verify"]) == 0  # an earlier export
    # A killed merge's build folder and replace_dir_atomic's previous destination: both carry the build marker.
    leftovers = [".DEST.merge-abc123", ".DEST.old"]
    # Other destinations' folders, and folders named like this destination's that lora-tune did not mark.
    unrelated = [".other.merge-x", ".DESTX.merge-y", ".DEST.merge-abc123.d", ".DEST.old.bak", "DEST.merge-z", ".DEST"]
    unmarked = [".DEST.merge-user", ".DEST.merge-abc999"]
    for name in leftovers + unrelated + unmarked:
        (parent / name).mkdir()
        (parent / name / "model.safetensors").write_bytes(b"\0" * 2**20)
        if name not in unmarked:
            (parent / name / BUILD_MARKER).write_text("")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious.txt").write_text("not a merge's")
    (outside / BUILD_MARKER).write_text("")
    (parent / ".DEST.merge-link").symlink_to(outside, target_is_directory=True)
    (parent / ".DEST.merge-file").write_text("a file, not a build folder")

    capsys.readouterr()
    assert main(["merge", str(run), "--output", str(dest), "--overwrite", "--no-verify"]) == 0
    printed = capsys.readouterr()
    line = next(line for line in (printed.out + printed.err).splitlines() if "left behind" in line)
    assert f"merge to '{dest}'" in line and ".DEST.merge-abc123, .DEST.old" in line and "(2.0 MiB)" in line, line
    left = sorted(p.name for p in parent.iterdir())
    expected = ["DEST", ".DEST.merge.lock", ".DEST.merge-link", ".DEST.merge-file", *unrelated, *unmarked]
    assert left == sorted(expected), "only the two marked leftovers of this destination went"
    assert all((parent / name / "model.safetensors").is_file() for name in unrelated + unmarked)
    assert (outside / "precious.txt").read_text() == "not a merge's", "a link is not followed"
    assert (dest / "config.json").is_file()


def test_leftovers_stay_when_the_merge_is_refused(tiny_model_dir: Path, tmp_path: Path):
    run = make_run(tmp_path, tiny_model_dir, lora())
    dest = tmp_path / "DEST"
    dest.mkdir()
    (dest / "x").write_text("x")
    (tmp_path / ".DEST.merge-abc123").mkdir()
    (tmp_path / ".DEST.merge-abc123" / BUILD_MARKER).write_text("")
    for flags in ([], ["--overwrite"]):  # a user's file in the destination: nothing is touched, either way
        assert main(["merge", str(run), "--output", str(dest), *flags]) == 2
    assert (tmp_path / ".DEST.merge-abc123").is_dir() and (dest / "x").read_text() == "x"


HF = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
HF_HUB = "hf_" + "ZyXwVuTsRqPoNmLkJiHgFeDcBa98765432"
OPENAI = "sk-proj-" + "a1B2c3D4e5F6g7H8i9J0kLmNoPqRsTuV"
AWS = "AKIA" + "IOSFODNN7EXAMPLE"
GITHUB = "ghp_" + "0123456789abcdefghijABCDEFGHIJklmnopqr"
PASSWORD = "s3cret-Pa55"
SECRETS = [HF, HF_HUB, OPENAI, AWS, GITHUB, PASSWORD]

SECRET_RECIPE = f"""\
model:
  name: {{model}}
  dtype: float32
adapter:
  r: 4
  alpha: 8
datasets:
  - path: data/{HF}_train.jsonl
    system_prompt: "keys {OPENAI}, {AWS} and {GITHUB} pasted by mistake"
  - path: https://alice:{PASSWORD}@data.example.com/x.jsonl
    columns: {{{{instruction: "q {HF}"}}}}
eval_datasets:
  - path: myorg/{HF_HUB}
output_dir: {{out}}
"""


def test_no_card_carries_a_credential_that_a_recipe_value_holds(tiny_model_dir: Path, tmp_path: Path):
    from lora_tune.export.card import adapter_card
    from lora_tune.recipe.load import load_recipe
    from lora_tune.run.layout import RunDir

    run = make_run(tmp_path, tiny_model_dir, lora())
    (run / "recipe.yaml").write_text(SECRET_RECIPE.format(model=tiny_model_dir, out=run))
    recipe = load_recipe(run / "recipe.yaml", check_paths=False)
    assert recipe.datasets[0].path == f"data/{HF}_train.jsonl", "the recipe itself keeps its values"
    merge(run, tmp_path / "merged", verify=False)
    cards = {"merged": (tmp_path / "merged" / "README.md").read_text(), "adapter": adapter_card(RunDir(run), recipe)}
    for kind, card in cards.items():
        for secret in SECRETS:
            assert secret not in card, f"{kind} card leaks {secret}"
        assert "https://***@data.example.com/x.jsonl" in card and "data/hf_***_train.jsonl" in card, kind
        assert "keys sk-***, AKIA*** and ghp_*** pasted by mistake" in card, kind
        meta = yaml.safe_load(card.split("---\n")[1])
        assert meta["datasets"] == ["myorg/hf_***"], kind  # the front matter is still valid YAML


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"token={HF}", "token=hf_***"),
        (f"data/{HF}_train.jsonl", "data/hf_***_train.jsonl"),
        (f"export OPENAI_API_KEY={OPENAI}", "export OPENAI_API_KEY=sk-***"),
        (f"aws {AWS}", "aws AKIA***"),
        (f"gh {GITHUB}.", "gh ghp_***."),
        ("github_pat_" + "1" * 22 + "_" + "a" * 59, "github_pat_***"),
        (f"https://alice:{PASSWORD}@host/x", "https://***@host/x"),
        ("git+https://oauth2:p@ss@gitlab.example.com/g/r.git", "git+https://***@gitlab.example.com/g/r.git"),
        (f"https://{GITHUB}@github.com/o/r", "https://***@github.com/o/r"),
    ],
)
def test_credential_shapes_are_masked(text: str, masked: str):
    from lora_tune.run.secrets import redact

    assert redact(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "hf_hub_download is a function name",
        "task-0123456789abcdefghijklmnop and disk-0123456789abcdefghijklmnop",
        "https://example.com/a@b and mail me at a@b.example",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "sk-learn",
    ],
)
def test_ordinary_text_is_not_masked(text: str):
    from lora_tune.run.secrets import redact

    assert redact(text) == text
