"""runtime.load_model / explain_load_failure: a refused file gets a message that says why and what
to do, instead of llama-cpp-python's bare "Failed to load model from file".

Loads the patched llama.cpp in this process (the files are refused cleanly; tests/test_hostile_files.py
proves that in child processes first). Needs the native build (scripts/setup.sh).
"""

from __future__ import annotations

import pytest

import hostile
from gqsa_gguf import runtime


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    names = ["gqsa_nan_scale", "gqsa_wrong_row_count", "gqsa_format_version_future", "bad_magic", "valid_w4s50"]
    return hostile.write_cases(tmp_path_factory.mktemp("load-errors"),
                               [c for c in hostile.CASES + hostile.POSITIVE if c.name in names])


def refusal(path) -> str:
    with pytest.raises(runtime.ModelLoadError) as e:
        runtime.load_model(path, n_ctx=64, verbose=False)
    assert isinstance(e.value, ValueError)          # what callers of llama_cpp.Llama already catch
    return str(e.value)


def test_corrupt_gqsa_data_is_named_by_both_readers(files):
    msg = refusal(files["gqsa_nan_scale"])
    assert "llama.cpp: " in msg and "tensor 'blk.1.attn_v.weight': row 2 block 0: scale is not finite" in msg
    assert "gqsa-gguf's reader finds the fault" in msg and "scale d = nan (fp16 bits 0x7e00)" in msg


def test_newer_format_says_upgrade(files):
    msg = refusal(files["gqsa_format_version_future"])
    assert "newer" in msg and "upgrade gqsa-gguf" in msg


def test_shape_the_model_does_not_expect_keeps_llama_cpp_reason(files):
    msg = refusal(files["gqsa_wrong_row_count"])
    assert "gqsa4 tensor 'blk.0.attn_k.weight' has shape" in msg
    assert "finds no fault in the GQSA data" in msg


def test_not_a_gguf_file(files, tmp_path):
    assert "bad magic b'GGUX'" in refusal(files["bad_magic"])
    assert "does not exist" in runtime.explain_load_failure(tmp_path / "missing.gguf", ValueError("x"))


def test_valid_file_loads_and_logging_is_restored(files):
    llm = runtime.load_model(files["valid_w4s50"], n_ctx=64, verbose=False)
    try:
        assert llm.n_vocab() == len(hostile.tiny_vocab()[0])
    finally:
        llm.close()


def test_stock_library_gets_the_install_hint(files, monkeypatch):
    """What a user of llama-cpp-python's own (stock) build sees: llama.cpp stops at the first gqsa4
    tensor info ("invalid ggml type 128", ggml/src/gguf.cpp); the hint says what to install."""
    monkeypatch.setattr(runtime, "loaded_library_is_patched", lambda: False)
    stock_log = ("gguf_init_from_reader: tensor 'blk.0.attn_q.weight' has invalid ggml type 128. "
                 "should be in [0, 43)\ngguf_init_from_reader: failed to read tensor info\n")
    msg = runtime.explain_load_failure(files["valid_w4s50"], ValueError("Failed to load model"), stock_log)
    for part in ("invalid ggml type 128", "GQSA tensor type gqsa4 (ggml type id 128; 14 tensors",
                 "pip install gqsa-gguf", "gqsa_gguf.runtime.import_llama_cpp()", "gqsa-gguf chat"):
        assert part in msg, part


def test_the_loaded_library_is_recognised_as_patched(files):
    runtime.import_llama_cpp()
    assert runtime.loaded_library_is_patched() is True
