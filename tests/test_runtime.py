"""gqsa_gguf.runtime against the built libraries: they are found, carry the GQSA type, and
llama-cpp-python binds to them and to nothing else.

These need the native build (scripts/setup.sh, or GQSA_GGUF_LIB_DIR=<build dir>/bin); without it
they fail with the message that says how to build, they do not skip. import_llama_cpp() binds a
process for good, so it is exercised in subprocesses.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gqsa_gguf import runtime
from gqsa_gguf.format import GGML_TYPE_GQSA4, TYPE_NAME

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=120)


def test_lib_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(runtime.LIB_DIR_ENV, str(tmp_path))
    assert runtime.lib_dir() == tmp_path.resolve()


def test_missing_libraries_say_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv(runtime.LIB_DIR_ENV, str(tmp_path))
    with pytest.raises(runtime.RuntimeLibraryError, match="scripts/setup.sh"):
        runtime.check_patched()
    with pytest.raises(runtime.RuntimeLibraryError, match="libgqsa_native.so not found"):
        runtime.native_lib()
    with pytest.raises(runtime.RuntimeLibraryError, match=f"{runtime.LIB_DIR_ENV}="):
        runtime.import_llama_cpp()


def test_built_libraries_are_all_there():
    d = runtime.lib_dir()
    names = {p.name for p in d.glob("lib*.so")}
    # a portable build has a CPU backend per variant (the test hooks inside each) instead of
    # libggml-cpu.so and libgqsa_native.so
    cpu = {"libggml-cpu-x64.so"} if runtime.is_portable(d) else {"libggml-cpu.so", "libgqsa_native.so"}
    missing = ({"libllama.so", "libggml.so", "libggml-base.so"} | cpu) - names
    assert not missing, f"{d} lacks {sorted(missing)}. {runtime.BUILD_HINT}"


def test_libraries_are_patched():
    assert runtime.check_patched(), f"{runtime.lib_dir()}/libggml-base.so has no {TYPE_NAME} type"


def test_type_name_comes_from_one_place():
    lib = ctypes.CDLL(str(runtime.lib_dir() / runtime.GGML_BASE_LIB_NAME))
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    assert lib.ggml_type_name(GGML_TYPE_GQSA4) == TYPE_NAME.encode()


def test_native_lib_loads():
    assert isinstance(runtime.native_lib(), ctypes.CDLL)


def test_import_llama_cpp_binds_our_libraries():
    proc = run_python("""
        from pathlib import Path
        from gqsa_gguf import runtime
        ll = runtime.import_llama_cpp()
        assert runtime.import_llama_cpp() is ll
        assert Path(ll.llama_cpp._base_path).resolve() == runtime.lib_dir(), ll.llama_cpp._base_path
        mapped = runtime._mapped_llama_libs()
        assert any(p.name == "libllama.so" for p in mapped), mapped
        assert all(p.resolve().parent == runtime.lib_dir() for p in mapped), mapped
        info = ll.llama_print_system_info().decode()
        assert "CPU" in info, info
        print("ok")
    """, env={runtime.LIB_DIR_ENV: str(runtime.lib_dir())})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_import_llama_cpp_refuses_bindings_bound_elsewhere(tmp_path):
    # llama_cpp imported first with another library directory (a copy of ours).
    other = tmp_path / "other"
    other.mkdir()
    for lib in runtime.lib_dir().glob("lib*.so"):
        (other / lib.name).write_bytes(lib.read_bytes())
    proc = run_python("""
        import llama_cpp
        from gqsa_gguf import runtime
        try:
            runtime.import_llama_cpp()
        except runtime.RuntimeLibraryError as e:
            print("refused:", e)
    """, env={"LLAMA_CPP_LIB_PATH": str(other),
              runtime.LIB_DIR_ENV: str(runtime.lib_dir())})
    assert "refused: llama_cpp was already imported" in proc.stdout, proc.stdout + proc.stderr


def test_import_llama_cpp_refuses_foreign_ggml_already_loaded(tmp_path):
    # Another libggml-base.so with the same soname loaded first would be reused by the loader.
    other = tmp_path / "other"
    other.mkdir()
    for lib in runtime.lib_dir().glob("libggml*.so"):
        (other / lib.name).write_bytes(lib.read_bytes())
    proc = run_python(f"""
        import ctypes
        ctypes.CDLL({str(other / "libggml-base.so")!r})
        from gqsa_gguf import runtime
        try:
            runtime.import_llama_cpp()
        except runtime.RuntimeLibraryError as e:
            print("refused:", e)
    """, env={runtime.LIB_DIR_ENV: str(runtime.lib_dir())})
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc/self/maps: the mapped-library check is Linux only")
    assert "refused: this process has llama.cpp libraries loaded from outside" in proc.stdout, \
        proc.stdout + proc.stderr


def test_a_cpu_variant_is_refused_where_the_build_has_none():
    # GQSA_GGUF_CPU_VARIANT picks a CPU variant of a portable build; a native build has none to pick,
    # and a portable one refuses a name it did not build: loudly, never by running something else
    proc = run_python("""
        from gqsa_gguf import runtime
        try:
            runtime.import_llama_cpp()
        except runtime.RuntimeLibraryError as e:
            print("refused:", e)
    """, env={runtime.LIB_DIR_ENV: str(runtime.lib_dir()), runtime.CPU_VARIANT_ENV: "nosuch"})
    want = "has no libggml-cpu-nosuch.so" if runtime.is_portable() else "holds a native build"
    assert "refused: GQSA_GGUF_CPU_VARIANT=nosuch" in proc.stdout and want in proc.stdout, proc.stdout + proc.stderr
