"""Hostile GGUF files (tests/hostile.py) against both readers of the format.

Every crafted file must be refused by our Python reader with GGUFError/GQSAFormatError naming the
problem (never IndexError, struct.error, MemoryError, ...), and by the patched llama.cpp loader with
a clean error: a ValueError in Python whose log names the problem, never a signal or a sanitizer
abort. The few cases a reader may accept say why in their `note`. Valid base files load in both and
generate a token with finite logits.

The llama.cpp side loads all files in one child process (restarted after a crash, so one crash
fails only its own case); under scripts/build_asan.sh --test the same tests run on the ASan/UBSan
build. Needs the native build (scripts/setup.sh); fails, not skips, without it.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

import hostile
from gqsa_gguf.codec import GQSAFormatError
from gqsa_gguf.gguf_io import GGUFError

ALL = hostile.CASES + hostile.POSITIVE


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return hostile.write_cases(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def loaded(files):
    return hostile.load_files([files[c.name] for c in ALL])


def test_catalogue():
    names = Counter(c.name for c in ALL)
    assert not [n for n, k in names.items() if k > 1], "case names must be unique"
    assert len(hostile.CASES) >= 30
    assert sum(c.gqsa for c in hostile.CASES) >= 15
    for c in hostile.CASES:
        assert c.python is not None or c.note, f"{c.name}: a case the reader accepts must say why"
        assert c.llama is not None or c.note, f"{c.name}: a case llama.cpp may load must say why"


def test_files_differ_from_their_base(files):
    bases = {b: files[f"valid_{b}"].read_bytes() for b in ("w4s50", "mixed", "w3s50")}
    for c in hostile.CASES:
        assert files[c.name].read_bytes() != bases[c.base], c.name


@pytest.mark.parametrize("case", hostile.CASES, ids=lambda c: c.name)
def test_python_reader_refuses(case, files):
    path = files[case.name]
    if case.python is None:
        hostile.python_read(path)           # accepted on purpose: see case.note
        return
    with pytest.raises((GGUFError, GQSAFormatError)) as e:
        hostile.python_read(path)
    assert re.search(case.python, str(e.value)), f"{case.name}: message does not name the problem: {e.value}"


@pytest.mark.parametrize("case", hostile.CASES, ids=lambda c: c.name)
def test_llama_cpp_refuses_cleanly(case, files, loaded):
    r = loaded[files[case.name]]
    assert r.outcome != "crashed", f"{case.name} ({case.what}) crashed llama.cpp: {r.describe()}"
    if case.llama is None:
        assert r.outcome in ("loaded", "refused"), r.describe()    # loading is allowed: see case.note
        return
    assert r.outcome == "refused", f"{case.name} ({case.what}) was not refused: {r.describe()}"
    assert re.search(case.llama, r.log + r.message), \
        f"{case.name}: llama.cpp's error does not name the problem /{case.llama}/: {r.describe()}"


@pytest.mark.parametrize("case", hostile.POSITIVE, ids=lambda c: c.name)
def test_valid_files_load_and_generate(case, files, loaded):
    f = hostile.python_read(files[case.name])
    assert len(f.gqsa) == 2 * len(hostile.LINEAR)
    for name in f.tensors:
        assert np.isfinite(f.tensor_array(name)).all(), name
    r = loaded[files[case.name]]
    assert r.outcome == "loaded", r.describe()
    assert r.token is not None and r.finite, r.describe()


def test_positive_controls_agree_where_the_weights_agree(files, loaded):
    """A metadata-only change that llama.cpp ignores leaves the model's output unchanged."""
    base = loaded[files["valid_w4s50"]]
    for c in hostile.CASES:
        r = loaded[files[c.name]]
        if r.outcome == "loaded" and c.name.startswith("gqsa_widths"):
            assert r.token == base.token, c.name


def test_harness_sees_a_crash_and_goes_on(files, monkeypatch):
    """A child killed by a signal fails its own file only; the next child loads the rest."""
    order = [files["bad_magic"], files["valid_w4s50"], files["gqsa_nan_scale"]]
    monkeypatch.setenv(hostile.SELFTEST_CRASH_ENV, order[1].name)
    got = hostile.load_files(order)
    assert got[order[0]].outcome == "refused"
    # SIGSEGV, or SIGABRT from AddressSanitizer's handler in the sanitizer build
    assert got[order[1]].outcome == "crashed" and "killed by signal" in got[order[1]].message
    assert got[order[2]].outcome == "refused"
