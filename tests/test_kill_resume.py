"""A converter killed with SIGKILL never leaves a partial file at its target, and --resume finishes.

The converter runs as a child process on a tiny LLaMA checkpoint with both training stages (BQPO and
E2E-OQP, checkpoints after every block and epoch) and is killed at several points: as the first
checkpoint folder appears, after the first BQPO checkpoint, after the E2E checkpoint, and while the
GGUF's temporary file is being written. Each time the target path must not exist; then `--resume`
with the same checkpoint folder must produce exactly the file of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_models import calib_file, checkpoint

ROOT = Path(__file__).resolve().parents[1]


# Runs convert.py with the tensor data of the GGUF written only after a pause: the temporary file
# (header and metadata written) then lives long enough to be seen; a tiny model's write takes
# milliseconds, which a polling watcher can miss.
_SLOW_WRITE = """
import runpy, sys, time
import gguf
_orig = gguf.GGUFWriter.write_tensors_to_file
def _slow(self, *a, **k):
    time.sleep(60)
    return _orig(self, *a, **k)
gguf.GGUFWriter.write_tensors_to_file = _slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _cmd(folder: Path, out: Path, ckdir: Path, resume: bool = False, slow_write: bool = False) -> list[str]:
    cmd = [sys.executable] + (["-c", _SLOW_WRITE] if slow_write else []) + [
           str(ROOT / "convert.py"), str(folder), "--gqsa", "w4s50", "-o", str(out),
           "--calib", str(calib_file(folder)), "--nsamples", "4", "--seqlen", "32",
           "--bqpo-epochs", "2", "--e2e-epochs", "2", "--e2e-windows", "0", "--checkpoint-dir", str(ckdir), "--threads", "1", "-q"]
    return cmd + (["--resume"] if resume else [])


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_until(cmd: list[str], ready, timeout: float = 300.0) -> bool:
    """Starts cmd, SIGKILLs it as soon as ready() is true; True if it was killed, False if it ended first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    deadline = time.time() + timeout
    try:
        while proc.poll() is None:
            if ready():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            if time.time() > deadline:
                raise AssertionError("the converter neither reached the kill point nor finished in time")
            time.sleep(0.005)
        err = proc.stderr.read().decode(errors="replace")
        assert proc.returncode == 0, err
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _content(path: Path) -> dict:
    """Everything the file holds except where it was written: gqsa.config records the output path."""
    import json

    import numpy as np

    from gqsa_gguf.gguf_io import read_gguf

    f = read_gguf(path)
    meta = {k: (np.asarray(v).tolist() if isinstance(v, (list, np.ndarray)) else v) for k, v in f.metadata.items()}
    config = json.loads(meta.pop("gqsa.config"))
    config.pop("output", None)
    meta["gqsa.config"] = config
    tensors = {name: f.tensor_bytes(name).tobytes() for name in f.tensors}
    return {"metadata": meta, "tensors": tensors}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = checkpoint("llama")
    run = tmp_path_factory.mktemp("ref") / "run0"
    run.mkdir()
    out = run / "model.gguf"
    subprocess.run(_cmd(folder, out, run / "ck"), check=True, env=_env(), capture_output=True)
    return folder, _content(out)


KILL_POINTS = {
    "checkpoint folder created": lambda run: (run / "ck").exists(),
    "first BQPO checkpoint": lambda run: any((run / "ck").glob("bqpo/*.ckpt")),
    "E2E checkpoint": lambda run: any((run / "ck").glob("e2e/*.ckpt")),
    "GGUF temporary file": lambda run: any(run.glob(".model.gguf.*.tmp")),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_leaves_no_partial_file_and_resume_matches(reference, tmp_path, point):
    folder, ref = reference
    run = tmp_path / "run1"
    run.mkdir()
    out = run / "model.gguf"
    killed = _run_until(_cmd(folder, out, run / "ck", slow_write=point == "GGUF temporary file"),
                        lambda: KILL_POINTS[point](run))
    if killed:
        assert not out.exists(), f"killed at '{point}': a file was left at the target path"
    else:
        pytest.fail(f"the converter finished before reaching '{point}'; the kill point is never seen")
    subprocess.run(_cmd(folder, out, run / "ck", resume=True), check=True, env=_env(), capture_output=True)
    got = _content(out)
    assert got["metadata"] == ref["metadata"]
    assert got["tensors"].keys() == ref["tensors"].keys()
    for name in ref["tensors"]:
        assert got["tensors"][name] == ref["tensors"][name], f"killed at '{point}', resumed: {name} differs"
    assert not list(run.glob(".model.gguf.*.tmp")) or point == "GGUF temporary file"
