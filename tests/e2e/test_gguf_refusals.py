"""Files llama.cpp could not run are refused, and a failed conversion says why, through llama.cpp's own converter:

- a merged folder whose config.json declares 3 layers but whose weights hold 2 converts cleanly (block_count 3, two
  layers of tensors, each equal to the merged one); the read-back refuses it, and so does llama.cpp's own load, which
  the stop check does (the vocabulary alone loads);
- a disk that fills while the converter writes: one line naming "No space left on device" and the file, not the
  progress bar the converter drew last. The disk is /dev/full, a real device whose every write fails with ENOSPC:
  a stand-in convert_hf_to_gguf.py runs llama.cpp's own and, once the header and tensor table are written, puts
  the output file (the converter's descriptor and the path) on it, so the tensor writes fail where a filling disk
  fails them; numpy's message for that short write carries no errno, as on a real full disk.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.export.errors import ExportError, VerificationError
from lora_tune.export.gguf_converter import SCRIPT, SOURCE_ENV, convert, converter_dir
from lora_tune.export.gguf_verify import verify_gguf
from tests.helpers import require_llama_cpp, tiny_llama_with_real_vocab

pytestmark = pytest.mark.slow  # four runs of llama.cpp's converter on a 128k-token vocabulary: about 70 s on 2 cores


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama (2 layers) with the real Llama 3 vocabulary, a copy whose config.json declares 3, and both
    converted to f16."""
    root = tmp_path_factory.mktemp("refusals")
    good = tiny_llama_with_real_vocab(root / "good")
    three = root / "three"
    shutil.copytree(good, three)
    config = json.loads((three / "config.json").read_text())
    (three / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    for folder in (good, three):
        convert(folder, root / f"{folder.name}-F16.gguf", "f16", folder.name)
    return {"root": root, "good": good, "three": three}


def test_a_config_declaring_more_layers_than_the_weights_hold_is_refused(folders) -> None:
    root = folders["root"]
    verify_gguf(root / "good-F16.gguf", folders["good"])  # the same weights, declared as they are: verified
    expected = f"three-F16.gguf has no tensors for layer 2: {folders['three']}/config.json declares 3 layers"
    with pytest.raises(VerificationError, match=expected):
        verify_gguf(root / "three-F16.gguf", folders["three"])


def test_export_of_such_a_folder_fails_in_one_line(folders, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["export", str(folders["three"]), "--quant", "f16", "--output", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no tensors for layer 2" in err[0]
    assert not list(out.glob("*.gguf"))


def test_the_stop_check_loads_the_model_not_only_the_vocabulary(folders) -> None:
    require_llama_cpp()
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from lora_tune.export.gguf_verify import llama_cpp_stops

    root = folders["root"]
    logger = _log_callback()
    tokenizer = AutoTokenizer.from_pretrained(folders["good"])
    eot, eos, word = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>", "Hello"])
    assert llama_cpp_stops(root / "good-F16.gguf", [eot, eos, word]) == {eot, eos}
    Llama(str(root / "three-F16.gguf"), vocab_only=True, verbose=False).close()  # the vocabulary alone loads
    with pytest.raises(
        VerificationError, match=r"cannot load three-F16.gguf: .*tensor 'blk\.2\.attn_norm\.weight' not found"
    ):
        llama_cpp_stops(root / "three-F16.gguf", [eot])
    assert _log_callback() == logger  # llama.cpp's log goes where it went before


def _log_callback() -> tuple[int | None, int | None]:
    import ctypes

    import llama_cpp

    callback, user = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(user))
    return ctypes.cast(callback, ctypes.c_void_p).value, user.value


# Runs llama.cpp's converter with the output file on /dev/full (its descriptor and its path) once the header and the
# tensor table are written: the next write is the first tensor's data, under the progress bar.
FULL_DISK_CONVERTER = """\
import os, runpy
import gguf

write_table = gguf.GGUFWriter.write_ti_data_to_file


def then_onto_a_full_disk(self):
    write_table(self)
    full = os.open("/dev/full", os.O_WRONLY)
    for fout in self.fout:
        fout.flush()
        os.dup2(full, fout.fileno())
        os.symlink("/dev/full", fout.name + ".full")
        os.replace(fout.name + ".full", fout.name)


gguf.GGUFWriter.write_ti_data_to_file = then_onto_a_full_disk
runpy.run_path(os.path.join(os.environ["REAL_CONVERTER"], "convert_hf_to_gguf.py"), run_name="__main__")
"""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_named_in_one_line(folders, tmp_path: Path, monkeypatch) -> None:
    real = converter_dir()
    stand_in = tmp_path / "llama.cpp"
    stand_in.mkdir()
    (stand_in / SCRIPT).write_text(FULL_DISK_CONVERTER)
    for part in ("gguf-py", "conversion"):
        (stand_in / part).symlink_to(real / part)
    monkeypatch.setenv(SOURCE_ENV, str(stand_in))
    monkeypatch.setenv("REAL_CONVERTER", str(real))
    outfile = tmp_path / "good-F16.gguf"
    with pytest.raises(ExportError) as caught:
        convert(folders["good"], outfile, "f16", "good")
    line = str(caught.value)
    assert line.startswith(f"No space left on device writing {outfile} (llama.cpp's GGUF converter; the file needs")
    assert "\n" not in line and "Writing" not in line
    assert not outfile.exists() and not list(tmp_path.glob("*.peak"))
    assert os.listdir(tmp_path) == ["llama.cpp"]
