"""Runtime loading of the patched llama.cpp libraries.

In:  the shared libraries the native build installs into gqsa_gguf/lib (libllama.so, libggml*.so,
     libgqsa_native.so), or the directory named by GQSA_GGUF_LIB_DIR (a dev build's
     `build/<wheel tag>/bin`); see lib_dir() for the search order.
Out: the `llama_cpp` module (llama-cpp-python 0.3.36) bound to those libraries, a check that they
     carry the GQSA type, and a ctypes handle on the C test hooks.

Invariants: llama-cpp-python binds its library once, at its first import, from the directory in
LLAMA_CPP_LIB_PATH; import_llama_cpp() sets it before that import and refuses a `llama_cpp`
already bound elsewhere. The dynamic loader shares libraries by soname within a process, so
import_llama_cpp() also checks (on Linux) that every libllama/libggml mapped into the process
comes from lib_dir(): a stock libggml loaded earlier would silently win otherwise.
"""

from __future__ import annotations

import ctypes
import os
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

from .format import GGML_TYPE_GQSA4, TYPE_NAME

LIB_DIR_ENV = "GQSA_GGUF_LIB_DIR"
DIST_NAME = "gqsa-gguf"
LLAMA_LIB_NAME = "libllama.so"
GGML_BASE_LIB_NAME = "libggml-base.so"
NATIVE_LIB_NAME = "libgqsa_native.so"
PATCH_MARKER_SYMBOL = "ggml_gqsa_validate"   # exported by libggml-base only when patched

BUILD_HINT = (
    "Build them with `bash scripts/setup.sh` (or `pip install .` from the repository, after "
    "`CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install llama-cpp-python==0.3.36`), or, for a dev build, "
    "`cmake -S . -B build/dev -G Ninja && cmake --build build/dev -j2` and "
    f"{LIB_DIR_ENV}=build/dev/bin. native/README.md has the details."
)


class RuntimeLibraryError(RuntimeError):
    """The native libraries are missing, unloadable, or not the ones in use."""


def lib_dir() -> Path:
    """Directory holding libllama.so and libggml*.so.

    $GQSA_GGUF_LIB_DIR if set; else gqsa_gguf/lib beside this module; else, when this module is
    imported from a source checkout (e.g. `python -m pytest` in the repository), the lib/ of the
    gqsa-gguf installed in this environment.
    """
    env = os.environ.get(LIB_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parent / "lib"
    if (here / LLAMA_LIB_NAME).is_file():
        return here
    try:
        installed = Path(str(metadata.distribution(DIST_NAME).locate_file("gqsa_gguf/lib")))
    except metadata.PackageNotFoundError:
        return here
    return installed.resolve() if (installed / LLAMA_LIB_NAME).is_file() else here


def _require(name: str) -> Path:
    d = lib_dir()
    path = d / name
    if not path.is_file():
        where = (f"{LIB_DIR_ENV}={d}" if os.environ.get(LIB_DIR_ENV)
                 else f"{d} (nor in an installed {DIST_NAME})")
        raise RuntimeLibraryError(f"{name} not found in {where}. {BUILD_HINT}")
    return path


def _mapped_llama_libs() -> list[Path]:
    """Paths of libllama*/libggml* mapped into this process (Linux only; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = set()
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            name = os.path.basename(parts[5])
            if name.startswith(("libllama.so", "libggml")):
                out.add(Path(parts[5]))
    return sorted(out)


def _check_mapped(d: Path) -> None:
    foreign = [p for p in _mapped_llama_libs() if p.resolve().parent != d.resolve()]
    if foreign:
        raise RuntimeLibraryError(
            "this process has llama.cpp libraries loaded from outside "
            f"{d}: {', '.join(map(str, foreign))}. The dynamic loader reuses them by name, so the "
            "GQSA-patched ones cannot be used. Import gqsa_gguf.runtime and call "
            "import_llama_cpp() before anything else loads llama.cpp (e.g. a llama-cpp-python "
            "built with its own libraries), in a fresh process.")


def import_llama_cpp() -> ModuleType:
    """Import `llama_cpp` bound to the libraries in lib_dir() and return the module."""
    d = lib_dir()
    _require(LLAMA_LIB_NAME)
    bound = sys.modules.get("llama_cpp.llama_cpp")
    if bound is not None:
        base = Path(getattr(bound, "_base_path", "")).resolve()
        if base != d.resolve():
            raise RuntimeLibraryError(
                f"llama_cpp was already imported with the libraries in {base}, not {d}. Call "
                "gqsa_gguf.runtime.import_llama_cpp() before any other `import llama_cpp`, in a "
                "fresh process.")
        _check_mapped(d)
        return sys.modules["llama_cpp"]
    os.environ["LLAMA_CPP_LIB_PATH"] = str(d)
    try:
        import llama_cpp
    except ImportError as e:
        raise RuntimeLibraryError(
            f"cannot import llama_cpp ({e}). Install the bindings without their own build: "
            "CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install llama-cpp-python==0.3.36") from e
    except (OSError, RuntimeError) as e:
        raise RuntimeLibraryError(f"llama_cpp failed to load {d / LLAMA_LIB_NAME}: {e}. "
                                  f"{BUILD_HINT}") from e
    _check_mapped(d)
    return llama_cpp


def check_patched() -> bool:
    """True if lib_dir()'s libggml-base knows the GQSA type (ggml_type_name(128) == b"gqsa4").

    ggml_type_name() indexes its type table unchecked in release builds, so type 128 is asked
    only of a library exporting the GQSA entry points (native/src/ggml/include/gqsa.h): on a
    stock one, whose table ends at its GGML_TYPE_COUNT, the answer is False without the call.
    """
    path = _require(GGML_BASE_LIB_NAME)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise RuntimeLibraryError(f"cannot load {path}: {e}. {BUILD_HINT}") from e
    if not hasattr(lib, PATCH_MARKER_SYMBOL):
        return False
    fn = lib.ggml_type_name
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_char_p
    return fn(GGML_TYPE_GQSA4) == TYPE_NAME.encode()


def native_lib() -> ctypes.CDLL:
    """ctypes handle on libgqsa_native.so (the C test hooks) from lib_dir()."""
    path = _require(NATIVE_LIB_NAME)
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise RuntimeLibraryError(f"cannot load {path}: {e}. {BUILD_HINT}") from e
