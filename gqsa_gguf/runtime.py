"""Runtime loading of the patched llama.cpp libraries.

In:  the shared libraries the native build installs into gqsa_gguf/lib (libllama.so, libggml*.so,
     libgqsa_native.so; a portable build has libggml-cpu-<variant>.so instead of libggml-cpu.so and
     libgqsa_native.so), or the directory named by GQSA_GGUF_LIB_DIR (a dev build's
     `build/<wheel tag>/bin`); see lib_dir() for the search order.
Out: the `llama_cpp` module (llama-cpp-python 0.3.36) bound to those libraries (in a portable
     build, with the best CPU variant loaded), a check that they carry the GQSA type, a ctypes
     handle on the C test hooks, and load_model() /
     explain_load_failure(): a refused file gets a message saying why and what to do (the install
     hint when a stock llama.cpp meets gqsa4 tensors).

Invariants: llama-cpp-python binds its library once, at its first import, from the directory in
LLAMA_CPP_LIB_PATH; import_llama_cpp() sets it before that import and refuses a `llama_cpp`
already bound elsewhere. The dynamic loader shares libraries by soname within a process, so
import_llama_cpp() also checks (on Linux) that every libllama/libggml mapped into the process
comes from lib_dir(): a stock libggml loaded earlier would silently win otherwise.
"""

from __future__ import annotations

import _ctypes
import contextlib
import ctypes
import dataclasses
import logging
import os
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

from .format import GGML_TYPE_GQSA4, TYPE_IDS, TYPE_NAME
from .errors import GQSAError

LIB_DIR_ENV = "GQSA_GGUF_LIB_DIR"
CPU_VARIANT_ENV = "GQSA_GGUF_CPU_VARIANT"   # portable build: load this CPU variant instead of the best
DIST_NAME = "gqsa-gguf"
LLAMA_LIB_NAME = "libllama.so"
GGML_BASE_LIB_NAME = "libggml-base.so"
NATIVE_LIB_NAME = "libgqsa_native.so"
GGML_LIB_NAME = "libggml.so"
CPU_VARIANT_PREFIX = "libggml-cpu-"      # a portable build's CPU backends: libggml-cpu-<variant>.so
PATCH_MARKER_SYMBOL = "ggml_gqsa_validate"   # exported by libggml-base only when patched

BUILD_HINT = (
    "Build them with `bash scripts/setup.sh` (or `pip install .` from the repository, after "
    "`CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install llama-cpp-python==0.3.36`), or, for a dev build, "
    "`cmake -S . -B build/dev -G Ninja && cmake --build build/dev -j2` and "
    f"{LIB_DIR_ENV}=build/dev/bin. native/README.md has the details."
)


class RuntimeLibraryError(GQSAError, RuntimeError):
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
    if is_portable(d):
        _load_cpu_backend(d)
    elif os.environ.get(CPU_VARIANT_ENV):
        raise RuntimeLibraryError(f"{CPU_VARIANT_ENV}={os.environ[CPU_VARIANT_ENV]} names a CPU variant, but {d} "
                                  "holds a native build (one libggml-cpu.so, no variants): unset it, or point "
                                  f"{LIB_DIR_ENV} at a portable build (scripts/setup.sh --portable)")
    return llama_cpp


# --- the portable build: one CPU backend per variant, chosen at run time ---------------------------
#
# A portable build (GQSA_PORTABLE, `scripts/setup.sh --portable`) has no libggml-cpu.so but one
# libggml-cpu-<variant>.so per CPU variant (x64, haswell, icelake, ...: ggml's
# GGML_CPU_ALL_VARIANTS), each with the GQSA kernels compiled for its features. Nothing loads them
# by itself: llama-cpp-python never calls ggml_backend_load_all, and ggml's own search looks beside
# the Python executable. import_llama_cpp() loads the best one from lib_dir() (or the one named by
# $GQSA_GGUF_CPU_VARIANT) once per process, before any model is created.

_cpu_backend_loaded: Path | None = None


@dataclasses.dataclass(frozen=True)
class CpuVariant:
    name: str          # ggml's tag: "x64", "haswell", "icelake", ...
    path: Path
    score: int         # the module's ggml_backend_score(): 0 = this CPU lacks a feature it needs


def is_portable(d: Path | None = None) -> bool:
    """Whether `d` (default lib_dir()) holds a portable build: CPU variants, no libggml-cpu.so."""
    d = lib_dir() if d is None else d
    return not (d / "libggml-cpu.so").is_file() and any(d.glob(f"{CPU_VARIANT_PREFIX}*.so"))


def cpu_variants(d: Path | None = None) -> list[CpuVariant]:
    """The CPU variants of a portable build in `d` (default lib_dir()), best first, with the score
    each gives this CPU (as ggml's loader asks them: dlopen, then ggml_backend_score()); [] for a
    native build."""
    d = lib_dir() if d is None else d
    out = []
    for path in sorted(d.glob(f"{CPU_VARIANT_PREFIX}*.so")):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise RuntimeLibraryError(f"cannot load {path}: {e}. {BUILD_HINT}") from e
        lib.ggml_backend_score.restype = ctypes.c_int
        out.append(CpuVariant(path.name[len(CPU_VARIANT_PREFIX):-len(".so")], path, int(lib.ggml_backend_score())))
        _ctypes.dlclose(lib._handle)     # as ggml's loader does; a module in use stays (reference count)
    return sorted(out, key=lambda v: (-v.score, v.name))


def _chosen_variant(d: Path) -> CpuVariant:
    """The variant $GQSA_GGUF_CPU_VARIANT names (refused if this CPU cannot run it), else the best."""
    variants = cpu_variants(d)
    want = os.environ.get(CPU_VARIANT_ENV)
    if want:
        match = [v for v in variants if v.name == want]
        if not match:
            raise RuntimeLibraryError(f"{CPU_VARIANT_ENV}={want}: {d} has no {CPU_VARIANT_PREFIX}{want}.so "
                                      f"(it has {', '.join(v.name for v in variants)})")
        if match[0].score == 0:
            raise RuntimeLibraryError(f"{CPU_VARIANT_ENV}={want}: this CPU lacks an instruction set that "
                                      f"variant needs (supported here: "
                                      f"{', '.join(v.name for v in variants if v.score > 0) or 'none'})")
        return match[0]
    if not variants or variants[0].score == 0:
        raise RuntimeLibraryError(f"no CPU variant in {d} runs on this CPU "
                                  f"({', '.join(v.name for v in variants) or 'none built'}). {BUILD_HINT}")
    return variants[0]


def _load_cpu_backend(d: Path) -> None:
    global _cpu_backend_loaded
    if _cpu_backend_loaded is not None:
        if _cpu_backend_loaded != d.resolve():
            raise RuntimeLibraryError(f"the CPU backend was loaded from {_cpu_backend_loaded}, not {d}")
        return
    ggml = ctypes.CDLL(str(_require(GGML_LIB_NAME)))        # already mapped by llama_cpp: the same copy
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    if not ggml.ggml_backend_reg_by_name(b"CPU"):
        # the chosen variant by path, as ggml_backend_load_all_from_path would choose it (the best
        # score), without the other backends' searches, or the one $GQSA_GGUF_CPU_VARIANT names
        variant = _chosen_variant(d)
        # ggml logs "load_backend: loaded CPU backend from ..." through llama-cpp-python's logger,
        # which prints everything until a Llama(verbose=False) quiets it: quiet for the load
        log = logging.getLogger("llama-cpp-python")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            loaded = ggml.ggml_backend_load(str(variant.path).encode())
        finally:
            log.setLevel(level)
        if not loaded:
            raise RuntimeLibraryError(f"ggml could not load the CPU backend {variant.path}")
    _cpu_backend_loaded = d.resolve()


def loaded_cpu_variant() -> str | None:
    """The CPU variant registered as ggml's CPU backend in this process (portable build), else None.

    Found by address: the backend registration ggml returns is a static object of the module that
    registered it, so the file mapped at that address is the variant (others may be mapped too:
    cpu_variants() and native_lib(variant) open them)."""
    if _cpu_backend_loaded is None:
        return None
    ggml = ctypes.CDLL(str(_cpu_backend_loaded / GGML_LIB_NAME))
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    reg = ggml.ggml_backend_reg_by_name(b"CPU")
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(maxsplit=5)
        lo, _, hi = parts[0].partition("-")
        if len(parts) == 6 and reg and int(lo, 16) <= reg < int(hi, 16):
            name = os.path.basename(parts[5])
            if name.startswith(CPU_VARIANT_PREFIX) and name.endswith(".so"):
                return name[len(CPU_VARIANT_PREFIX):-len(".so")]
    return None


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


def native_lib(variant: str | None = None) -> ctypes.CDLL:
    """ctypes handle on the C test hooks: libgqsa_native.so from lib_dir(), or in a portable build
    the CPU variant module that holds them, `variant` or else the one import_llama_cpp() loads."""
    d = lib_dir()
    if variant is not None or is_portable(d):
        if variant is None:
            path = _chosen_variant(d).path
        else:
            path = d / f"{CPU_VARIANT_PREFIX}{variant}.so"
            if not path.is_file():
                raise RuntimeLibraryError(f"{path} not found: {d} has no CPU variant {variant!r}")
        try:
            return ctypes.CDLL(str(path))
        except OSError as e:
            raise RuntimeLibraryError(f"cannot load {path}: {e}. {BUILD_HINT}") from e
    path = _require(NATIVE_LIB_NAME)
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise RuntimeLibraryError(f"cannot load {path}: {e}. {BUILD_HINT}") from e


# --- explaining a refused file ---------------------------------------------------------------------
#
# llama-cpp-python turns every load failure into ValueError("Failed to load model from file: X")
# and, with verbose=False, sends llama.cpp's own message to /dev/null. A stock llama.cpp (e.g. the
# library llama-cpp-python builds by default) stops at the first gqsa4 tensor info with
#     gguf_init_from_reader: tensor 'blk.0.attn_q.weight' has invalid ggml type 128. should be in [0, 43)
# (ggml/src/gguf.cpp of the pinned commit), which says nothing about what to install. load_model()
# keeps llama.cpp's errors and explain_load_failure() adds what gqsa-gguf knows about the file.

GGML_LOG_LEVEL_ERROR = 4      # enum ggml_log_level of the pinned llama.cpp (NONE DEBUG INFO WARN ERROR CONT)
GGML_LOG_LEVEL_CONT = 5

STOCK_RUNTIME_HINT = (
    "this file uses the GQSA tensor type {type_name} (ggml type id {type_id}; {n} tensors, e.g. '{example}'), "
    "which stock llama.cpp builds do not know: they report \"invalid ggml type {type_id}\". Load it with "
    "gqsa-gguf's patched llama.cpp: `pip install gqsa-gguf` (or `bash scripts/setup.sh` in its "
    "repository), then in Python call gqsa_gguf.runtime.import_llama_cpp() before anything else "
    "imports llama_cpp and use the module it returns (or gqsa_gguf.runtime.load_model(path)); from a "
    "shell, `gqsa-gguf chat FILE` and `gqsa-gguf eval FILE` do this for you."
)


class ModelLoadError(GQSAError, ValueError):
    """llama.cpp refused a model file; the message says why and what to do."""


def loaded_library_is_patched() -> bool | None:
    """Whether the llama.cpp library mapped into this process carries the GQSA type.

    None when no libllama/libggml-base is mapped yet (or /proc/self/maps is unavailable). A
    library already mapped is opened again by path, which returns the loaded copy.
    """
    libs = _mapped_llama_libs()
    for prefix in ("libggml-base", "libllama"):      # the marker lives in ggml-base; libllama if static
        for path in libs:
            if path.name.startswith(prefix):
                try:
                    if hasattr(ctypes.CDLL(str(path)), PATCH_MARKER_SYMBOL):
                        return True
                except OSError:
                    continue
    return False if libs else None


def _library_is_patched() -> bool:
    loaded = loaded_library_is_patched()
    if loaded is not None:
        return loaded
    try:
        return check_patched()
    except RuntimeLibraryError:
        return False


def explain_load_failure(path: os.PathLike[str] | str, exc: BaseException | None = None,
                         log: str = "") -> str:
    """Why llama.cpp could not load `path`, and what to do: a message for the user.

    `exc` is what loading raised and `log` llama.cpp's error output, if captured (load_model does).
    The file is then read with gqsa-gguf's own reader: a malformed file gets the reader's precise
    message (tensor, row, block, value); a file with gqsa4 tensors meeting a library without the GQSA
    type gets the install hint (STOCK_RUNTIME_HINT); a file the reader finds sound leaves llama.cpp's
    message as the reason (e.g. a tensor shape the architecture does not expect).
    """
    from .gguf_io import GGUFError, read_gguf      # numpy and gguf: imported only when explaining

    parts = [f"cannot load {path}" + (f" ({exc})" if exc is not None else "")]
    errors = [line.strip() for line in log.splitlines() if line.strip()]
    if errors:
        parts.append("llama.cpp: " + " | ".join(errors[-4:]))
    try:
        f = read_gguf(path)
    except FileNotFoundError:
        parts.append("the file does not exist")
        return "\n".join(parts)
    except OSError as e:
        parts.append(f"the file cannot be read: {e}")
        return "\n".join(parts)
    except GGUFError as e:
        parts.append(f"gqsa-gguf's reader finds the fault: {e}")
        return "\n".join(parts)

    gqsa = [t for t in f.tensors.values() if t.type_id in TYPE_IDS]
    if not gqsa:
        return "\n".join(parts)       # a stock file: llama.cpp's message is all there is
    if not _library_is_patched():
        parts.append(STOCK_RUNTIME_HINT.format(type_name=TYPE_IDS[gqsa[0].type_id].name, type_id=gqsa[0].type_id,
                                               n=len(gqsa), example=gqsa[0].name))
        return "\n".join(parts)
    try:
        for name in f.gqsa:
            f.gqsa_tensor(name)
    except GGUFError as e:
        parts.append(f"gqsa-gguf's reader finds the fault: {e}")
        return "\n".join(parts)
    parts.append("gqsa-gguf's reader finds no fault in the GQSA data, so llama.cpp's message is the "
                 "reason (e.g. a gqsa4 tensor this architecture does not expect, or a shape that does "
                 "not fit it); if it is unclear, load with verbose=True for llama.cpp's full log")
    return "\n".join(parts)


@contextlib.contextmanager
def explained_load_errors(path: os.PathLike[str] | str):
    """Context in which llama_cpp.Llama(model_path=path, ...) is created (directly, or by code that
    does it for us, like llama_cpp.server's create_app): llama.cpp's error log is captured, and a
    ValueError raised inside becomes ModelLoadError with explain_load_failure's message. The log
    callback in place before is restored (and chained to meanwhile)."""
    llama_cpp = import_llama_cpp()
    previous = getattr(getattr(llama_cpp, "_logger", None), "llama_log_callback", None)
    errors: list[str] = []
    state = {"error": False}

    @llama_cpp.llama_log_callback
    def on_log(level, text, user_data):
        if level != GGML_LOG_LEVEL_CONT:
            state["error"] = level == GGML_LOG_LEVEL_ERROR
        if state["error"]:
            errors.append(text.decode("utf-8", errors="replace"))
        if previous is not None:
            previous(level, text, user_data)

    llama_cpp.llama_log_set(on_log, None)
    try:
        yield
    except ModelLoadError:
        raise
    except ValueError as e:
        raise ModelLoadError(explain_load_failure(path, e, "".join(errors))) from e
    finally:
        llama_cpp.llama_log_set(previous, None)


def load_model(path: os.PathLike[str] | str, **llama_kwargs):
    """llama_cpp.Llama(model_path=path, **llama_kwargs) on the patched libraries; a refused file
    raises ModelLoadError with explain_load_failure's message (llama.cpp's errors included)."""
    llama_cpp = import_llama_cpp()
    with explained_load_errors(path):
        return llama_cpp.Llama(model_path=str(path), **llama_kwargs)
