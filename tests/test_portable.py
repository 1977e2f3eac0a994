"""The portable build (GQSA_PORTABLE, `scripts/setup.sh --portable`): one CPU backend per CPU
variant, libggml-cpu-<variant>.so, each with the GQSA kernels its features allow; import_llama_cpp()
loads the best this CPU runs, or the one $GQSA_GGUF_CPU_VARIANT names.

Run against a portable build with GQSA_GGUF_LIB_DIR=<its build dir>/bin (scripts/test.sh
--portable does); against a native build (one libggml-cpu.so) they skip. The kernels of each
variant are tested by tests/test_native_kernels.py, which runs every kernel test once per variant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gqsa_gguf import bench, runtime

pytestmark = pytest.mark.skipif(not runtime.is_portable(),
                                reason=f"a native build in {runtime.lib_dir()}: these test a portable one "
                                       f"({runtime.LIB_DIR_ENV}=<portable build>/bin)")

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, variant: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, runtime.LIB_DIR_ENV: str(runtime.lib_dir())}
    env.pop(runtime.CPU_VARIANT_ENV, None)
    if variant is not None:
        env[runtime.CPU_VARIANT_ENV] = variant
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


DECODE = """
    import json
    import numpy as np
    from gqsa_gguf import runtime
    ll = runtime.import_llama_cpp()
    llm = ll.Llama(model_path={path!r}, n_ctx=64, n_threads=2, verbose=False)
    llm.eval([1000 + i for i in range(12)])
    logits = np.array(llm.scores[llm.n_tokens - 1], np.float64)
    print(json.dumps({{"variant": runtime.loaded_cpu_variant(), "logits": logits.tolist(),
                      "info": ll.llama_print_system_info().decode()}}))
"""


@pytest.fixture(scope="module")
def gqsa_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("portable") / "tiny-w4s50.gguf"
    bench.write_model(bench.Shape("tiny", 256, 512, 2, 4, 4, n_vocab=2048), "w4s50", path,
                      bench._RandomWeights(seed=0))
    return path


def test_variants_are_scored_by_this_cpu():
    variants = runtime.cpu_variants()
    assert [v.score for v in variants] == sorted((v.score for v in variants), reverse=True)
    assert any(v.name == "x64" and v.score > 0 for v in variants), variants   # the baseline runs anywhere


def test_the_best_variant_is_loaded_and_decodes_gqsa(gqsa_model):
    best = runtime.cpu_variants()[0]
    proc = run_python(DECODE.format(path=str(gqsa_model)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["variant"] == best.name
    assert np.isfinite(out["logits"]).all()


LOAD_LOG = """
    from gqsa_gguf import runtime
    ll = runtime.import_llama_cpp()
    print("variant", runtime.loaded_cpu_variant(), flush=True)
    llm = ll.Llama(model_path={path!r}, n_ctx=64, n_threads=1, verbose=True)
    llm.eval([1000, 1001])
"""


@pytest.mark.parametrize("variant", [None, "x64"], ids=["best", "x64"])
def test_gqsa_weights_are_repacked_by_the_loaded_variant(gqsa_model, variant):
    # the CPU_GQSA buffer type (superblocks, ggml-cpu-gqsa-repack.cpp) lives in each variant module:
    # llama.cpp must find it through the dynamically loaded backend and put the GQSA weights there
    # where the variant has the superblock kernels (AVX2 and up), and not in the scalar x64 one
    v = runtime.cpu_variants()[0] if variant is None else next(x for x in runtime.cpu_variants() if x.name == variant)
    proc = run_python(LOAD_LOG.format(path=str(gqsa_model)), variant=variant)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"variant {v.name}" in proc.stdout
    log = proc.stderr
    assert "CPU_Mapped model buffer size" in log or "CPU model buffer size" in log, log[-3000:]
    import ctypes
    lib = runtime.native_lib(v.name)
    lib.gqsa_test_sb_kernel.restype = ctypes.c_char_p
    if lib.gqsa_test_sb_kernel().decode() == "none":
        assert "CPU_GQSA" not in log
    else:
        assert "CPU_GQSA model buffer size" in log, log[-3000:]


def test_every_variant_this_cpu_runs_gives_the_same_logits(gqsa_model):
    # the same integer dot products in every variant's kernels; only the float sums' order differs
    results = {}
    for v in runtime.cpu_variants():
        if v.score == 0:
            continue
        proc = run_python(DECODE.format(path=str(gqsa_model)), variant=v.name)
        assert proc.returncode == 0, (v.name, proc.stderr[-3000:])
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["variant"] == v.name
        results[v.name] = np.array(out["logits"])
        if v.name == "x64":
            assert "AVX2 = 1" not in out["info"], out["info"]      # the x86-64 baseline: no AVX2 kernels
    assert len(results) >= 2, results.keys()
    ref = results.pop("x64")
    for name, logits in results.items():
        assert np.abs(logits - ref).max() <= 1e-3 * np.abs(ref).max(), name


def test_an_unknown_variant_is_refused_with_the_list():
    proc = run_python("""
        from gqsa_gguf import runtime
        try:
            runtime.import_llama_cpp()
        except runtime.RuntimeLibraryError as e:
            print("refused:", e)
    """, variant="nosuch")
    assert "refused: GQSA_GGUF_CPU_VARIANT=nosuch" in proc.stdout and "x64" in proc.stdout, proc.stdout + proc.stderr
