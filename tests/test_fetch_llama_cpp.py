"""native/fetch_llama_cpp.py on a small fake llama.cpp tree: overlay and patch land, nothing
upstream is overwritten, a bad patch or a wrong source stops with a clear error, and re-runs are
idempotent and touch only the files that change (so rebuilds stay incremental)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fetch_llama_cpp",
                                               REPO / "native" / "fetch_llama_cpp.py")
fetch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch)

needs_patch = pytest.mark.skipif(shutil.which("patch") is None, reason="no `patch` program")

UPSTREAM = {
    "CMakeLists.txt": "project(fake)\n",
    "ggml/src/ggml.c": "int a;\nint b;\nint c;\n",
    "ggml/src/old.c": "int old;\n",
    "src/llama.cpp": "int llama;\n",
}


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def make_patch(tmp: Path, edits: dict[str, str | None]) -> str:
    """A -p1 unified diff (diff -ruN) turning UPSTREAM into UPSTREAM + edits (None: delete)."""
    a, b = tmp / "a", tmp / "b"
    shutil.rmtree(a, ignore_errors=True)
    shutil.rmtree(b, ignore_errors=True)
    write_tree(a, UPSTREAM)
    write_tree(b, UPSTREAM)
    for rel, text in edits.items():
        if text is None:
            (b / rel).unlink()
        else:
            write_tree(b, {rel: text})
    proc = subprocess.run(["diff", "-ruN", "a", "b"], cwd=tmp, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    return proc.stdout


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fake pristine tree (pristine_tree() redirected to it), empty native/src, no patch."""
    pristine = tmp_path / "pristine"
    write_tree(pristine, UPSTREAM)
    monkeypatch.setattr(fetch, "pristine_tree", lambda source, cache: (pristine, "test:1"))
    native_src = tmp_path / "native_src"
    native_src.mkdir()
    ns = {"pristine": pristine, "native_src": native_src, "patch": tmp_path / "llama.cpp.patch",
          "tree": tmp_path / "build" / "llama.cpp", "tmp": tmp_path}

    def run(**kw):
        ns["tree"].parent.mkdir(exist_ok=True)
        fetch.prepare(ns["tree"], "", tmp_path / "cache", ns["native_src"], ns["patch"], **kw)
        return ns["tree"]

    ns["run"] = run
    return ns


def read(tree: Path) -> dict[str, str]:
    return {p.relative_to(tree).as_posix(): p.read_text() for p in tree.rglob("*") if p.is_file()}


def test_patch_paths_strip_one_component_and_skip_dev_null():
    text = ("--- a/ggml/src/ggml.c\t2020\n+++ b/ggml/src/ggml.c\t2020\n@@ -1 +1 @@\n"
            "--- /dev/null\n+++ b/ggml/src/new.c\n@@ -0,0 +1 @@\n"
            "--- a/ggml/src/old.c\n+++ /dev/null\n@@ -1 +0,0 @@\n")
    assert fetch.patch_paths(text) == ["ggml/src/ggml.c", "ggml/src/new.c", "ggml/src/old.c"]


@pytest.mark.parametrize("header", ["--- ggml.c\n", "--- a/../etc/passwd\n"])
def test_patch_paths_refuse_p0_and_escaping_paths(header):
    with pytest.raises(fetch.PrepareError):
        fetch.patch_paths(header)


def test_stock_tree_without_overlay_or_patch(env):
    tree = env["run"]()
    assert read(tree) == UPSTREAM


@needs_patch
def test_overlay_and_patch_land(env):
    write_tree(env["native_src"], {"ggml/src/ggml-gqsa.c": "int gqsa;\n",
                                   "tests/gqsa_testlib.c": "int t;\n"})
    env["patch"].write_text(make_patch(env["tmp"], {"ggml/src/ggml.c": "int a;\nint B;\nint c;\n",
                                                    "ggml/src/old.c": None}))
    tree = env["run"]()
    want = dict(UPSTREAM, **{"ggml/src/ggml.c": "int a;\nint B;\nint c;\n",
                             "ggml/src/ggml-gqsa.c": "int gqsa;\n", "tests/gqsa_testlib.c": "int t;\n"})
    del want["ggml/src/old.c"]
    assert read(tree) == want
    assert read(env["pristine"]) == UPSTREAM          # the pristine tree is never written


@needs_patch
def test_rerun_is_idempotent_and_touches_only_changed_files(env):
    write_tree(env["native_src"], {"ggml/src/ggml-gqsa.c": "int gqsa;\n"})
    env["patch"].write_text(make_patch(env["tmp"], {"ggml/src/ggml.c": "int a;\nint B;\nint c;\n"}))
    tree = env["run"]()
    old = 1_000_000_000
    for p in tree.rglob("*"):
        os.utime(p, (old, old))
    env["run"]()                                       # nothing changed
    assert all(p.stat().st_mtime == old for p in tree.rglob("*") if p.is_file())

    write_tree(env["native_src"], {"ggml/src/ggml-gqsa.c": "int gqsa2;\n"})
    env["run"]()                                       # one overlay file changed
    changed = {p.relative_to(tree).as_posix() for p in tree.rglob("*")
               if p.is_file() and p.stat().st_mtime != old}
    assert changed == {"ggml/src/ggml-gqsa.c"}


@needs_patch
def test_dropping_patch_and_overlay_restores_pristine(env):
    write_tree(env["native_src"], {"ggml/src/ggml-gqsa.c": "int gqsa;\n"})
    env["patch"].write_text(make_patch(env["tmp"], {"ggml/src/ggml.c": "int X;\n",
                                                    "ggml/src/old.c": None}))
    env["run"]()
    env["patch"].unlink()
    shutil.rmtree(env["native_src"])
    tree = env["run"]()
    assert read(tree) == UPSTREAM


def test_overlay_may_not_overwrite_upstream(env):
    write_tree(env["native_src"], {"ggml/src/ggml.c": "int evil;\n"})
    with pytest.raises(fetch.PrepareError, match="would overwrite the upstream file ggml/src/ggml.c"):
        env["run"]()


@needs_patch
def test_patch_that_does_not_apply_fails_loudly(env):
    text = make_patch(env["tmp"], {"ggml/src/ggml.c": "int a;\nint B;\nint c;\n"})
    env["patch"].write_text(text.replace(" int a;", " int z;"))
    with pytest.raises(fetch.PrepareError, match="does not apply") as err:
        env["run"]()
    assert "FAILED" in str(err.value)


def test_sdist_hash_mismatch_is_refused(tmp_path):
    bogus = tmp_path / fetch.PINNED_SDIST
    bogus.write_bytes(b"not the sdist")
    with pytest.raises(fetch.PrepareError, match="SHA-256 mismatch"):
        fetch.check_sdist(bogus)


def test_directory_source_must_be_the_pinned_commit(tmp_path):
    write_tree(tmp_path, dict(UPSTREAM, **{"ggml/CMakeLists.txt": "", "include/llama.h": "x",
                                           "ggml/include/ggml.h": "y"}))
    with pytest.raises(fetch.PrepareError, match=f"is not llama.cpp commit {fetch.PINNED_COMMIT}"):
        fetch.pristine_tree(str(tmp_path), tmp_path / "cache")


def test_missing_source_is_reported(tmp_path):
    with pytest.raises(fetch.PrepareError, match="does not exist"):
        fetch.pristine_tree(str(tmp_path / "nope.tar.gz"), tmp_path / "cache")


# --------------------------------------------------------------------------------------------
# The offline bundle (--pack-bundle): what travels to a GPU machine without network


@pytest.fixture
def fake_pinned(tmp_path, monkeypatch):
    """A fake pristine tree that passes check_source_dir (PINNED_FILES pointed at its headers),
    with files in excluded folders."""
    tree = tmp_path / "pristine"
    write_tree(tree, dict(UPSTREAM, **{"ggml/CMakeLists.txt": "g\n", "include/llama.h": "L\n",
                                       "ggml/include/ggml.h": "G\n", "docs/big.md": "doc\n",
                                       "tools/ui/app.js": "ui\n", "tools/llama-bench/b.cpp": "bench\n"}))
    monkeypatch.setattr(fetch, "PINNED_FILES", {rel: fetch.sha256_file(tree / rel)
                                                for rel in ("include/llama.h", "ggml/include/ggml.h")})
    return tree


def test_bundle_round_trip_leaves_out_only_the_excluded(tmp_path, fake_pinned):
    out = tmp_path / "b" / fetch.BUNDLE_NAME
    manifest = fetch.pack_bundle(fake_pinned, out)
    assert "docs/big.md" not in manifest["files"] and "tools/ui/app.js" not in manifest["files"]
    tree, ident = fetch.pristine_tree(str(out), tmp_path / "cache")
    assert ident == f"bundle:{fetch.sha256_file(out)}"
    want = {k: v for k, v in read(fake_pinned).items() if not k.startswith(("docs/", "tools/ui/"))}
    assert {k: v for k, v in read(tree).items() if k != ".gqsa-complete"} == want
    # extracted once: a second call reuses the cache
    assert fetch.pristine_tree(str(out), tmp_path / "cache")[0] == tree


def _rewrite_bundle(src: Path, dst: Path, edit):
    import io
    import tarfile
    with tarfile.open(src, "r:xz") as tin, tarfile.open(dst, "w:xz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            data = edit(m.name, data)
            if data is not None:
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
            else:
                tout.addfile(m)


def test_bundle_with_a_changed_file_is_refused(tmp_path, fake_pinned):
    good = tmp_path / fetch.BUNDLE_NAME
    fetch.pack_bundle(fake_pinned, good)
    bad = tmp_path / "bad" / fetch.BUNDLE_NAME
    bad.parent.mkdir()
    _rewrite_bundle(good, bad, lambda name, data: b"int b;\n" if name == "llama.cpp/src/llama.cpp" else data)
    with pytest.raises(fetch.PrepareError, match="src/llama.cpp has SHA-256 .* corrupt"):
        fetch.pristine_tree(str(bad), tmp_path / "cache")


def test_bundle_of_another_commit_is_refused(tmp_path, fake_pinned):
    good = tmp_path / fetch.BUNDLE_NAME
    fetch.pack_bundle(fake_pinned, good)
    bad = tmp_path / "bad" / fetch.BUNDLE_NAME
    bad.parent.mkdir()
    _rewrite_bundle(good, bad, lambda name, data: data.replace(fetch.PINNED_COMMIT.encode(), b"1234567")
                    if name == fetch.BUNDLE_MANIFEST else data)
    with pytest.raises(fetch.PrepareError, match="'1234567'.*pinned to"):
        fetch.pristine_tree(str(bad), tmp_path / "cache")


def test_bundle_over_the_size_limit_is_not_written(tmp_path, fake_pinned, monkeypatch):
    monkeypatch.setattr(fetch, "BUNDLE_MAX_BYTES", 100)
    out = tmp_path / fetch.BUNDLE_NAME
    with pytest.raises(fetch.PrepareError, match="over"):
        fetch.pack_bundle(fake_pinned, out)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
