#!/usr/bin/env python3
"""Prepare the patched llama.cpp source tree that the native build compiles.

In:  the pinned llama.cpp source (the `vendor/llama.cpp` of llama-cpp-python's sdist, fetched with
     pip into a cache, or named by --source / GQSA_LLAMA_CPP_SOURCE: the sdist, an offline bundle
     written by --pack-bundle, or an extracted tree), our new files under
     native/src/ (a mirror of the llama.cpp tree) and native/llama.cpp.patch (unified diff, -p1,
     relative to the llama.cpp root; absent or empty means a stock build).
Out: --tree DIR, a copy of the pristine tree with native/src copied over it and the patch applied,
     plus DIR.state.json describing how it was made.

Invariants:
  * llama.cpp is the commit llama-cpp-python PINNED_VERSION was released with, so the bindings
    and the library agree; the sdist is checked against PINNED_SHA256, a directory source against
    the SHA-256 of two public headers.
  * native/src never overwrites an upstream file: changes to upstream files go in the patch, so
    the patch lists every upstream file we touch.
  * Re-running is idempotent and cheap. The tree is copied in full only when the pristine source
    changes; otherwise only the files native/src or the patch touch (now or last time) are
    rewritten, and only when their content differs, so unchanged files keep their mtimes and an
    incremental build recompiles only what changed.

Standard library only: CMake runs this with the build's Python, which may be a bare interpreter
re-running configure from `cmake --build`. pip is needed only to download the sdist.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PINNED_PACKAGE = "llama-cpp-python"
PINNED_VERSION = "0.3.36"
PINNED_SDIST = f"llama_cpp_python-{PINNED_VERSION}.tar.gz"
PINNED_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PINNED_COMMIT = "0c1e570"          # llama.cpp commit vendored by that sdist
VENDOR_PREFIX = f"llama_cpp_python-{PINNED_VERSION}/vendor/llama.cpp/"
# SHA-256 of files of the pinned tree, to recognise it when it is given as a directory.
PINNED_FILES = {
    "include/llama.h": "d5cf9203bea63b575e76cba4881f29cfd1b611451578b01582b75b72ecbb04bc",
    "ggml/include/ggml.h": "12ee71f99db7db9b353bc02b1fbb57c344ee17c01ac5fb7952b41a637a747ea9",
}
# Bump when the way the tree is assembled changes, to force a re-sync.
LAYOUT_VERSION = "2"

# The offline bundle (--pack-bundle): the pinned tree without what no build of ours reads (docs,
# test models, media, CI files, examples, upstream's tests, the server's web UI), as .tar.xz, for a
# machine that can neither download the sdist nor receive it (76 MB, over the 64 MiB a GPU machine
# of this project receives). A manifest of every file's SHA-256 travels inside and is checked at
# extraction, as are the PINNED_FILES.
BUNDLE_NAME = f"llama.cpp-{PINNED_COMMIT}-bundle.tar.xz"
BUNDLE_MANIFEST = "gqsa-bundle.json"
BUNDLE_EXCLUDE = (".github", ".devops", "docs", "models", "media", "benches", "examples", "pocs",
                  "tests", "tools/ui")
BUNDLE_MAX_BYTES = 56 << 20     # leaves room for the working tree in the 64 MiB a GPU machine gets

OFFLINE_HINT = (
    f"On a machine without access to PyPI, fetch {PINNED_SDIST} elsewhere with\n"
    f"  python -m pip download --no-deps --no-binary :all: --no-build-isolation "
    f"{PINNED_PACKAGE}=={PINNED_VERSION} -d DIR\n"
    f"and set GQSA_LLAMA_CPP_SOURCE=DIR/{PINNED_SDIST} (or to an extracted llama.cpp tree at "
    f"commit {PINNED_COMMIT})."
)


class PrepareError(Exception):
    """A failure the user can fix; main() prints it without a traceback."""


def log(msg: str) -> None:
    print(f"-- gqsa llama.cpp: {msg}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    env = os.environ.get("GQSA_GGUF_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gqsa-gguf"


# --------------------------------------------------------------------------------------------
# Obtaining the pristine tree


def check_sdist(path: Path) -> None:
    got = sha256_file(path)
    if got != PINNED_SHA256:
        raise PrepareError(
            f"SHA-256 mismatch for {path}:\n  expected {PINNED_SHA256}\n  got      {got}\n"
            f"It is not the {PINNED_PACKAGE} {PINNED_VERSION} sdist this build is pinned to "
            f"(or the download is corrupt). Delete it and re-run, or point GQSA_LLAMA_CPP_SOURCE "
            f"at a verified copy.")


def download_sdist(cache: Path) -> Path:
    """pip-download the pinned sdist into `cache`, verify it, and return its path."""
    target = cache / PINNED_SDIST
    if target.is_file():
        return target
    if importlib.util.find_spec("pip") is None:
        raise PrepareError(f"cannot download {PINNED_SDIST}: pip is not importable by "
                           f"{sys.executable}.\n{OFFLINE_HINT}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-d", tmp, f"{PINNED_PACKAGE}=={PINNED_VERSION}"]
        # pip prepares the sdist's metadata; with scikit-build-core at hand (it is, inside our
        # own build environment) that needs no second isolated environment.
        if importlib.util.find_spec("scikit_build_core") is not None:
            cmd.insert(4, "--no-build-isolation")
        log(f"downloading {PINNED_PACKAGE}=={PINNED_VERSION} sdist with pip into {cache}")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise PrepareError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{OFFLINE_HINT}")
        got = Path(tmp) / PINNED_SDIST
        if not got.is_file():
            raise PrepareError(f"pip download did not produce {PINNED_SDIST} (got "
                               f"{sorted(os.listdir(tmp))}).\n{OFFLINE_HINT}")
        check_sdist(got)
        os.replace(got, target)
    return target


def extract_sdist(sdist: Path, cache: Path) -> Path:
    """Extract the sdist's vendor/llama.cpp into the cache once (keyed by the sdist hash)."""
    dest = cache / f"llama.cpp-{PINNED_COMMIT}-{PINNED_SHA256[:12]}"
    if (dest / ".gqsa-complete").is_file():
        return dest
    check_sdist(sdist)
    cache.mkdir(parents=True, exist_ok=True)
    log(f"extracting vendor/llama.cpp from {sdist.name} into {dest}")
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".extract-"))
    os.chmod(tmp, 0o755)
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(VENDOR_PREFIX):
                    continue
                m.name = m.name[len(VENDOR_PREFIX):]
                # .git is the submodule's pointer into llama-cpp-python's repository; without
                # it upstream's CMake asks git about a repository that is not there.
                if m.name and m.name != ".git":
                    members.append(m)
            if not members:
                raise PrepareError(f"{sdist} has no {VENDOR_PREFIX} directory")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
        (tmp / ".gqsa-complete").write_text(f"{PINNED_SHA256}\n")
        if dest.exists():                      # an interrupted or concurrent extraction
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / ".gqsa-complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_source_dir(src: Path) -> None:
    for rel in ("CMakeLists.txt", "ggml/CMakeLists.txt", "src/llama.cpp", *PINNED_FILES):
        if not (src / rel).is_file():
            raise PrepareError(f"GQSA_LLAMA_CPP_SOURCE={src} is not a llama.cpp source tree: "
                               f"{rel} is missing")
    for rel, want in PINNED_FILES.items():
        got = sha256_file(src / rel)
        if got != want:
            raise PrepareError(
                f"GQSA_LLAMA_CPP_SOURCE={src} is not llama.cpp commit {PINNED_COMMIT}: {rel} has "
                f"SHA-256 {got}, expected {want}. The Python bindings ({PINNED_PACKAGE} "
                f"{PINNED_VERSION}) only work with that commit; use its vendor/llama.cpp.")


def _bundle_excluded(rel: str) -> bool:
    return any(rel == x or rel.startswith(x + "/") for x in BUNDLE_EXCLUDE)


def pack_bundle(pristine: Path, out: Path) -> dict:
    """Write the offline bundle of the pristine tree to `out` (.tar.xz); return its manifest."""
    files = {}
    for root, dirs, names in os.walk(pristine):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(pristine).as_posix()
            if name == ".gqsa-complete" or _bundle_excluded(rel):
                continue
            files[rel] = ("link:" + os.readlink(path)) if path.is_symlink() else sha256_file(path)
    manifest = {"bundle_format": 1, "commit": PINNED_COMMIT, "sdist": PINNED_SDIST,
                "sdist_sha256": PINNED_SHA256, "excluded": list(BUNDLE_EXCLUDE), "files": files}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    data = json.dumps(manifest, indent=0, sort_keys=True).encode()
    with tarfile.open(tmp, "w:xz", preset=6) as tar:
        info = tarfile.TarInfo(BUNDLE_MANIFEST)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
        for rel in files:
            tar.add(pristine / rel, arcname=f"llama.cpp/{rel}", recursive=False)
    size = tmp.stat().st_size
    if size > BUNDLE_MAX_BYTES:
        tmp.unlink()
        raise PrepareError(f"the bundle would be {size / 2**20:.1f} MiB, over {BUNDLE_MAX_BYTES >> 20} MiB; "
                           f"exclude more of the tree (BUNDLE_EXCLUDE)")
    os.replace(tmp, out)
    log(f"wrote {out} ({size / 2**20:.1f} MiB, {len(files)} files of llama.cpp {PINNED_COMMIT})")
    return manifest


def extract_bundle(bundle: Path, cache: Path) -> tuple[Path, str]:
    """Extract an offline bundle into the cache once (keyed by its hash), checking every file
    against its manifest and the tree against PINNED_FILES. Returns (tree, pristine id)."""
    digest = sha256_file(bundle)
    dest = cache / f"llama.cpp-{PINNED_COMMIT}-bundle-{digest[:12]}"
    if (dest / ".gqsa-complete").is_file():
        return dest, f"bundle:{digest}"
    cache.mkdir(parents=True, exist_ok=True)
    log(f"extracting the offline bundle {bundle.name} into {dest}")
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".bundle-"))
    os.chmod(tmp, 0o755)
    try:
        try:
            with tarfile.open(bundle, "r:*") as tar:
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, **kwargs)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise PrepareError(f"{bundle} is not a readable bundle ({e}); pack it again with "
                               f"`python native/fetch_llama_cpp.py --pack-bundle OUT`") from e
        try:
            manifest = json.loads((tmp / BUNDLE_MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise PrepareError(f"{bundle} has no valid {BUNDLE_MANIFEST}: not a gqsa-gguf bundle") from e
        if manifest.get("commit") != PINNED_COMMIT or manifest.get("sdist_sha256") != PINNED_SHA256:
            raise PrepareError(f"{bundle} holds llama.cpp {manifest.get('commit')!r} from an sdist with "
                               f"SHA-256 {manifest.get('sdist_sha256')!r}; this build is pinned to "
                               f"{PINNED_COMMIT} ({PINNED_SHA256})")
        tree = tmp / "llama.cpp"
        found = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file() or p.is_symlink()}
        want = manifest.get("files", {})
        if found != set(want):
            extra, missing = sorted(found - set(want)), sorted(set(want) - found)
            raise PrepareError(f"{bundle} does not match its manifest: {len(missing)} file(s) missing "
                               f"{missing[:3]}, {len(extra)} unlisted {extra[:3]}")
        for rel, h in want.items():
            got = ("link:" + os.readlink(tree / rel)) if (tree / rel).is_symlink() else sha256_file(tree / rel)
            if got != h:
                raise PrepareError(f"{bundle}: {rel} has SHA-256 {got}, its manifest says {h}: the "
                                   f"bundle is corrupt; pack it again")
        check_source_dir(tree)
        (tree / ".gqsa-complete").write_text(f"{digest}\n")
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        os.replace(tree, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest, f"bundle:{digest}"


def pristine_tree(source: str, cache: Path) -> tuple[Path, str]:
    """Return (pristine llama.cpp directory, an id that changes when its content may change)."""
    if not source:
        sdist = download_sdist(cache)
        return extract_sdist(sdist, cache), f"sdist:{PINNED_SHA256}"
    src = Path(source).expanduser().resolve()
    if src.is_file():
        if src.name.endswith(".tar.xz"):
            return extract_bundle(src, cache)
        if not src.name.endswith(".tar.gz"):
            raise PrepareError(f"GQSA_LLAMA_CPP_SOURCE={src}: expected the {PINNED_SDIST} sdist, "
                               f"an offline bundle ({BUNDLE_NAME}) or an extracted llama.cpp directory")
        return extract_sdist(src, cache), f"sdist:{PINNED_SHA256}"
    if src.is_dir():
        check_source_dir(src)
        return src, f"dir:{src}"
    raise PrepareError(f"GQSA_LLAMA_CPP_SOURCE={source} does not exist")


# --------------------------------------------------------------------------------------------
# Overlay and patch


def overlay_files(native_src: Path) -> list[str]:
    """Relative paths of the files under native/src (hidden files and editor backups skipped)."""
    if not native_src.is_dir():
        return []
    out = []
    for root, dirs, files in os.walk(native_src):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.startswith(".") or name.endswith("~"):
                continue
            out.append((Path(root) / name).relative_to(native_src).as_posix())
    return out


def patch_paths(text: str) -> list[str]:
    """Files a -p1 unified diff touches, from its ---/+++ headers."""
    paths = []
    for line in text.splitlines():
        if not (line.startswith("--- ") or line.startswith("+++ ")):
            continue
        name = line[4:].split("\t")[0].strip()
        if name == "/dev/null":
            continue
        parts = name.split("/", 1)
        if len(parts) != 2 or not parts[1]:
            raise PrepareError(f"native/llama.cpp.patch: cannot strip one directory from header "
                               f"{line!r}; the patch must be -p1 (a/path b/path)")
        rel = parts[1]
        if rel.startswith("/") or ".." in rel.split("/"):
            raise PrepareError(f"native/llama.cpp.patch: path {rel!r} leaves the llama.cpp tree")
        if rel not in paths:
            paths.append(rel)
    return paths


def inputs_hash(pristine_id: str, native_src: Path, overlay: list[str], patch_text: str) -> str:
    h = hashlib.sha256()
    h.update(f"layout {LAYOUT_VERSION}\npristine {pristine_id}\n".encode())
    for rel in overlay:
        h.update(f"file {rel} {sha256_file(native_src / rel)}\n".encode())
    h.update(b"patch\n" + patch_text.encode())
    return h.hexdigest()


def stage(pristine: Path, native_src: Path, overlay: list[str], patch_file: Path | None,
          patch_text: str, touched: list[str], stage_dir: Path) -> None:
    """Build in stage_dir the final content of every file that overlay or patch touch."""
    for rel in overlay:
        if (pristine / rel).exists():
            raise PrepareError(
                f"native/src/{rel} would overwrite the upstream file {rel}. native/src holds new "
                f"files only; put changes to upstream files in native/llama.cpp.patch.")
        dst = stage_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(native_src / rel, dst)
    for rel in touched:
        if rel not in overlay and (pristine / rel).is_file():
            dst = stage_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pristine / rel, dst)
    if not touched:
        return
    if shutil.which("patch") is None:
        raise PrepareError("the `patch` program is needed to apply native/llama.cpp.patch; "
                           "install it (Debian: apt-get install patch)")
    # --fuzz=0: the base is pinned, so every hunk must match its context exactly.
    cmd = ["patch", "-p1", "--forward", "--batch", "--fuzz=0", "--no-backup-if-mismatch",
           "-d", str(stage_dir), "-i", str(patch_file)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        rejects = ""
        for rej in sorted(stage_dir.rglob("*.rej")):
            rejects += f"\n--- {rej.relative_to(stage_dir)}:\n{rej.read_text(errors='replace')}"
        raise PrepareError(
            f"native/llama.cpp.patch does not apply to llama.cpp {PINNED_COMMIT} "
            f"(`{' '.join(cmd)}` exit {proc.returncode}):\n{proc.stdout}{rejects}\n"
            f"Regenerate it against the pristine tree ({pristine}), e.g. with "
            f"`diff -ruN` or `git diff` from the llama.cpp root.")


def same_content(a: Path, b: Path) -> bool:
    if not (a.is_file() and b.is_file()) or a.stat().st_size != b.stat().st_size:
        return False
    return a.read_bytes() == b.read_bytes()


def update_file(src: Path, dst: Path) -> bool:
    if same_content(src, dst):
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".gqsa-tmp")
    shutil.copyfile(src, tmp)
    shutil.copymode(src, tmp)
    os.replace(tmp, dst)
    return True


def remove_file(path: Path) -> bool:
    if path.is_file() or path.is_symlink():
        path.unlink()
        return True
    return False


# --------------------------------------------------------------------------------------------


def prepare(tree: Path, source: str, cache: Path, native_src: Path, patch_file: Path,
            fresh: bool = False) -> None:
    tree = tree.resolve()
    state_file = tree.with_name(tree.name + ".state.json")
    pristine, pristine_id = pristine_tree(source, cache)

    patch_text = patch_file.read_text() if patch_file.is_file() else ""
    touched = patch_paths(patch_text)
    if not touched:
        patch_text = ""                        # absent, empty or header-less: a stock build
    overlay = overlay_files(native_src)
    digest = inputs_hash(pristine_id, native_src, overlay, patch_text)

    state = {}
    if state_file.is_file() and tree.is_dir() and not fresh:
        try:
            state = json.loads(state_file.read_text())
        except ValueError:
            state = {}
    if state.get("inputs") == digest:
        log(f"{tree} is up to date")
        return

    if state.get("pristine_id") != pristine_id or state.get("layout") != LAYOUT_VERSION:
        log(f"copying pristine llama.cpp {PINNED_COMMIT} from {pristine} to {tree}")
        state_file.unlink(missing_ok=True)
        if tree.exists():
            shutil.rmtree(tree)
        shutil.copytree(pristine, tree, symlinks=True,
                        ignore=lambda d, names: [n for n in names
                                                 if n in (".gqsa-complete", ".git")])
        state = {"modified": []}

    stage_dir = Path(tempfile.mkdtemp(dir=tree.parent, prefix=".llama.cpp-stage-"))
    try:
        stage(pristine, native_src, overlay, patch_file, patch_text, touched, stage_dir)
        wanted = {p.relative_to(stage_dir).as_posix() for p in stage_dir.rglob("*")
                  if p.is_file()}
        deleted = [rel for rel in touched if rel not in wanted]   # files the patch removes
        changed = 0
        # Files we changed last time but no longer do go back to their pristine content.
        for rel in state.get("modified", []):
            if rel in wanted or rel in deleted:
                continue
            if (pristine / rel).is_file():
                changed += update_file(pristine / rel, tree / rel)
            else:
                changed += remove_file(tree / rel)
        for rel in sorted(wanted):
            changed += update_file(stage_dir / rel, tree / rel)
        for rel in deleted:
            changed += remove_file(tree / rel)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)

    state = {"layout": LAYOUT_VERSION, "commit": PINNED_COMMIT, "pristine_id": pristine_id, "pristine": str(pristine),
             "inputs": digest, "modified": sorted(wanted | set(deleted)),
             "overlay": overlay, "patched": touched}
    state_file.write_text(json.dumps(state, indent=1) + "\n")
    log(f"{tree}: {len(overlay)} file(s) from native/src, patch touches {len(touched)} "
        f"upstream file(s), {changed} file(s) rewritten")


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path,
                    help="where to assemble the patched llama.cpp tree")
    ap.add_argument("--pack-bundle", type=Path, metavar="OUT",
                    help=f"instead: write the offline bundle ({BUNDLE_NAME}, what a build needs of the "
                         f"pinned tree, under {BUNDLE_MAX_BYTES >> 20} MiB) to OUT; a build takes it as "
                         f"GQSA_LLAMA_CPP_SOURCE")
    ap.add_argument("--source", default=os.environ.get("GQSA_LLAMA_CPP_SOURCE", ""),
                    help=f"local {PINNED_SDIST} or extracted llama.cpp directory "
                         f"(default: $GQSA_LLAMA_CPP_SOURCE, else download with pip)")
    ap.add_argument("--cache-dir", default="",
                    help="download/extract cache (default: $GQSA_GGUF_CACHE or "
                         "~/.cache/gqsa-gguf)")
    ap.add_argument("--native-src", type=Path, default=here / "src")
    ap.add_argument("--patch", type=Path, default=here / "llama.cpp.patch")
    ap.add_argument("--fresh", action="store_true", help="re-copy the whole pristine tree")
    args = ap.parse_args(argv)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    if (args.tree is None) == (args.pack_bundle is None):
        ap.error("give exactly one of --tree and --pack-bundle")
    try:
        if args.pack_bundle is not None:
            pack_bundle(pristine_tree(args.source, cache)[0], args.pack_bundle)
            return 0
        prepare(args.tree, args.source, cache, args.native_src, args.patch,
                fresh=args.fresh)
    except PrepareError as e:
        print(f"gqsa llama.cpp: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
