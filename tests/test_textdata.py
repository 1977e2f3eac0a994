"""textdata: the Debian-package texts, the calibration mix (prose + code + technical text) and its
separation from the evaluation text debian:debian-handbook.

The extractors and the mixing are tested on small hand-made package trees; the tests marked by the
`debian_texts` fixture fetch the real packages (once; cached under cache_root()/text) and are
skipped with the reason where the Debian archive cannot be reached.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess

import pytest

from gqsa_gguf import calib, textdata
from gqsa_gguf.textdata import TextDataError

MIX = "calib-mix"


# --- the recipe --------------------------------------------------------------------------------------

def test_mix_parts_are_sources_and_never_the_evaluation_text():
    parts = textdata.MIXES[MIX]
    assert parts == ("janeaustenr", "python3-stdlib", "python3-doc")
    for p in parts:
        assert p in textdata.SOURCES and p not in textdata.MIXES
        assert textdata.SOURCES[p][0] != "debian-handbook"
    assert "debian-handbook" not in textdata.SOURCES[MIX][0]
    assert textdata.SOURCES[MIX][0] == "r-cran-janeaustenr + libpython3.11-stdlib + python3.11-doc"


def test_chunks_end_at_paragraph_breaks_and_lose_no_paragraph():
    paras = [f"paragraph {i} " + "x" * (i * 37 % 300) for i in range(200)]
    text = "\n\n".join(paras) + "\n"
    pieces = textdata._chunks(text, 1000)
    assert "\n\n".join(pieces).split("\n\n") == paras
    assert all(len(p) >= 1000 for p in pieces[:-1])
    assert all(len(p) < 1000 + 400 for p in pieces)            # never more than one paragraph past


def test_mix_interleaves_equal_shares_spread_over_each_part():
    parts = ["\n\n".join(f"{tag}{i:05d} " + tag * 90 for i in range(n)) for tag, n in
             (("A", 3000), ("B", 1000), ("C", 50))]
    mix = textdata.mix_text(parts, total=90_000, chunk=1000)
    assert mix == textdata.mix_text(parts, total=90_000, chunk=1000)
    paras = mix.rstrip("\n").split("\n\n")
    share = {t: sum(len(p) + 2 for p in paras if p.startswith(t)) for t in "ABC"}
    assert 0.9 * 30_000 < share["A"] < 1.1 * 30_000 and 0.9 * 30_000 < share["B"] < 1.1 * 30_000
    assert share["C"] == len(parts[2]) + 2                     # shorter than its share: whole
    # A's chunks come from all over A, in order, not from its start only
    a_ids = [int(p[1:6]) for p in paras if p.startswith("A")]
    assert a_ids == sorted(a_ids) and a_ids[0] < 300 and a_ids[-1] > 2700
    # round-robin: runs of paragraphs (one chunk each) from A, B, C in turn, until C runs out
    runs = [t for t, _ in itertools.groupby(p[0] for p in paras)]
    assert runs[:6] == ["A", "B", "C", "A", "B", "C"] and set(runs[-6:]) == {"A", "B"}


# --- extractors, on hand-made package trees --------------------------------------------------------------

def test_python_stdlib_text_keeps_code_and_skips_data_modules(tmp_path):
    lib = tmp_path / "usr/lib/python3.11"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pydoc_data").mkdir()
    (lib / "html").mkdir()
    (lib / "zmod.py").write_text("def f():\r\n    return 1   \r\n\r\n\r\n\r\n\r\ndef g():\r\n    pass\r\n")
    (lib / "pkg/__init__.py").write_text("\n\nclass A:\n    x = 1\n\n")
    (lib / "pkg/empty.py").write_text("\n")
    (lib / "pydoc_data/topics.py").write_text("topics = {'x': 'y'}\n")
    (lib / "html/entities.py").write_text("name2codepoint = {}\n")
    (lib / "_sysconfigdata__linux_x86_64-linux-gnu.py").write_text("build_time_vars = {}\n")
    text = textdata.python_stdlib_text(tmp_path)
    assert text == ("# file: Lib/pkg/__init__.py\n\nclass A:\n    x = 1\n\n"
                    "# file: Lib/zmod.py\n\ndef f():\n    return 1\n\n\ndef g():\n    pass\n")
    with pytest.raises(TextDataError, match="no \\*.py files"):
        textdata.python_stdlib_text(tmp_path / "elsewhere")


_SPHINX_PAGE = """<!DOCTYPE html><html><head><title>4. More Control Flow Tools</title>
<script>var x = 1;</script></head><body>
<div class="related" role="navigation"><ul><li><a href="index.html">index</a></li></ul></div>
<div class="document"><div class="documentwrapper"><div class="bodywrapper">
<div class="body" role="main">
<section id="x"><h1><span class="section-number">4. </span>More Control Flow Tools<a class="headerlink"
 href="#x" title="Permalink">¶</a></h1>
<p>Besides the <code class="docutils literal"><span class="pre">while</span></code> statement
just introduced, Python uses a few more.</p>
<div class="highlight"><pre><span class="gp">&gt;&gt;&gt; </span><span class="n">x</span> = 1
<span class="gp">&gt;&gt;&gt; </span>if x:
<span class="gp">... </span>    print(x)
</pre></div>
<dl><dt class="sig"><span class="sig-name">range</span>(stop)<a class="headerlink" href="#r">¶</a></dt>
<dd><p>Return a range.</p></dd></dl>
</section></div></div></div>
<div class="sphinxsidebar" role="navigation"><h3>Table of Contents</h3><p>Previous topic</p></div>
</div><div class="footer">&copy; Copyright 2001-2023.</div></body></html>
"""


def test_python_doc_text_takes_the_page_body_of_the_chosen_sections(tmp_path):
    html = tmp_path / "usr/share/doc/python3.11/html"
    for rel in ("tutorial/controlflow.html", "library/x.html", "whatsnew/3.11.html", "c-api/y.html",
                "genindex-A.html", "glossary.html"):
        (html / rel).parent.mkdir(parents=True, exist_ok=True)
        (html / rel).write_text(_SPHINX_PAGE.replace("Besides", f"[{rel}] Besides"))
    text = textdata.python_doc_text(tmp_path)
    pages = text.split("4. More Control Flow Tools\n\n")[1:]
    assert [p.split("]")[0][1:] for p in pages] == ["glossary.html", "library/x.html", "tutorial/controlflow.html"]
    assert pages[0] == ("[glossary.html] Besides the while statement just introduced, Python uses a few more.\n\n"
                        ">>> x = 1\n>>> if x:\n...     print(x)\n\nrange(stop)\n\nReturn a range.\n\n")
    for dropped in ("¶", "index", "Table of Contents", "Previous topic", "Copyright", "var x"):
        assert dropped not in text
    with pytest.raises(TextDataError, match="no HTML pages"):
        textdata.python_doc_text(tmp_path / "elsewhere")


# --- failures say what to do --------------------------------------------------------------------------

@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GQSA_GGUF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_failed_download_of_a_mix_part_names_the_package_and_the_way_around(empty_cache, monkeypatch):
    calls = []

    def failing_run(cmd, cwd):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 100, "", f"E: Unable to locate package {cmd[-1]}")

    monkeypatch.setattr(textdata, "_run", failing_run)
    with pytest.raises(TextDataError) as e:
        textdata.text_path(MIX)
    msg = str(e.value)
    assert "could not download the Debian package 'r-cran-janeaustenr'" in msg
    assert "Unable to locate package" in msg and "apt-get update" in msg and "--calib FILE" in msg
    assert calls and all(c[0] == "apt-get" for c in calls)
    assert not list(empty_cache.rglob("*.txt"))                 # nothing half-made is cached
    with pytest.raises(calib.CalibError, match="--calib FILE"):  # what convert prints
        calib.load_text("debian:" + MIX)


def test_missing_apt_get_is_named(empty_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(TextDataError, match="'apt-get' is not installed.*--calib FILE"):
        textdata.text_path("python3-doc")


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(TextDataError, match="debian:calib-mix") as e:
        textdata.text_path("no-such-text")
    assert "debian:python3-stdlib" in str(e.value) and "debian:python3-doc" in str(e.value)


# --- the real packages ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def debian_texts():
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get/dpkg-deb not installed: the Debian texts cannot be fetched here")
    try:
        return {n: textdata.read_text(n) for n in (*textdata.MIXES[MIX], MIX, "debian-handbook")}
    except TextDataError as e:
        pytest.skip(f"the Debian archive is not reachable: {e}")


def test_the_parts_are_real_text_of_their_kind(debian_texts):
    austen, code, doc = (debian_texts[n] for n in textdata.MIXES[MIX])
    assert len(austen) > 3_000_000 and "Elizabeth" in austen and "Mr. Darcy" in austen
    assert len(code) > 2_000_000 and "# file: Lib/asyncio/base_events.py\n" in code
    assert "\n    def __init__(self" in code                  # indentation kept
    assert "# file: Lib/pydoc_data/" not in code and "# file: Lib/pydoc.py\n" in code
    assert len(doc) > 2_000_000 and "An Informal Introduction to Python" in doc
    assert ">>> " in doc and "¶" not in doc


def test_the_mix_holds_a_third_of_each_part(debian_texts):
    mix = debian_texts[MIX]
    parts = [debian_texts[n] for n in textdata.MIXES[MIX]]
    assert mix == textdata.mix_text(parts)                   # the cached mix is the recipe's output
    assert 0.95 * textdata.MIX_CHARS < len(mix) < 1.05 * textdata.MIX_CHARS
    for name, part in zip(textdata.MIXES[MIX], parts):
        taken = sum(len(c) for c in textdata._chunks(part, textdata.MIX_CHUNK_CHARS) if c in mix)
        assert 0.28 < taken / len(mix) < 0.39, (name, taken, len(mix))


def test_the_mix_shares_no_paragraph_with_the_evaluation_text(debian_texts):
    handbook = {p.strip() for p in debian_texts["debian-handbook"].split("\n\n")}
    mix = [p.strip() for p in debian_texts[MIX].split("\n\n")]
    shared = [p for p in mix if len(p) >= 40 and p in handbook]
    assert not shared, shared[:5]
    # the handbook's longer paragraphs do not occur inside the mix either (a sample of them)
    long_paras = sorted(p for p in handbook if len(p) >= 200)[::25]
    assert long_paras and not [p for p in long_paras if p in debian_texts[MIX]]
