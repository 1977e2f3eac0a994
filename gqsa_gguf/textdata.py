"""Real text from Debian packages, extracted to plain text and cached.

No model hub or dataset hub is reachable from our machines, but Debian's package archive is, so
the project's default texts come from Debian packages (versions: Debian 12 "bookworm"):

    "debian:janeaustenr"     prose      Jane Austen's six novels (r-cran-janeaustenr, R data), 4.0M chars
    "debian:python3-stdlib"  code       the pure-Python modules of CPython 3.11's standard library
                                        (libpython3.11-stdlib; each file headed "# file: Lib/<path>";
                                        pydoc_data/, html/entities.py and _sysconfigdata* left out as
                                        data, not code), 4.7M chars
    "debian:python3-doc"     technical  the Python 3.11 documentation (python3.11-doc, Sphinx HTML):
                                        tutorial, language and library references, HOWTOs, FAQs,
                                        extending/embedding, glossary, 6.9M chars
    "debian:calib-mix"       calibration mix of the three above, like the prose + code + technical
                                        text small instruct models are trained on: MIX_CHARS (3M)
                                        characters, a third from each part, in chunks of about
                                        MIX_CHUNK_CHARS (4K) characters cut at paragraph breaks,
                                        chunks spread evenly over each whole part and interleaved
                                        round-robin (prose, code, technical, prose, ...). A random
                                        calibration window therefore mostly lies in one domain and
                                        every domain is represented. No randomness: the same package
                                        versions give the same text.
    "debian:debian-handbook" evaluation The Debian Administrator's Handbook, en-US (HTML)

The evaluation text is kept strictly apart from calibration: none of the calibration parts comes
from the debian-handbook package or is about Debian administration, and the tests check that the
mix shares no paragraph with it (tests/test_textdata.py).

In:  a source name from `SOURCES`.
Out: `text_path(name)` -> Path of a UTF-8 plain-text file (cached under cache_root()/text);
     `read_text(name)` -> its content. Paragraphs are separated by one blank line (source code
     keeps its own lines, indentation and up to two blank lines in a row).

Fetching uses `apt-get download` + `dpkg-deb -x` into a temporary folder (no root install); a
failure says which command failed and how to get around it (`--calib FILE`). A mix fetches its
parts first (each cached as its own text) and is cached itself.
"""

from __future__ import annotations

import html.parser
import os
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Callable

from .config import cache_root
from .errors import GQSAError

__all__ = ["SOURCES", "MIXES", "TextDataError", "text_path", "read_text", "austen_text", "handbook_text",
           "python_stdlib_text", "python_doc_text", "mix_text"]


class TextDataError(GQSAError, RuntimeError):
    """A Debian text could not be fetched or extracted; the message says how to work around it."""


def _paragraphs(lines) -> str:
    """Joins wrapped lines into paragraphs separated by one blank line."""
    paras, cur = [], []
    for line in lines:
        line = " ".join(str(line).split())
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras) + "\n"


# --- Jane Austen (R lazy-load database) ---------------------------------------------------------

_AUSTEN_DIR = "usr/lib/R/site-library/janeaustenr/data"
_AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                 "northangerabbey", "persuasion")


def _decompress_rdb_entry(blob: bytes, compressed) -> bytes:
    """One object of an R lazy-load .rdb: a 4-byte big-endian length, then the compressed stream
    (R's `makeLazyLoadDB`: zlib by default; type byte + bzip2/xz for compress = 2/3)."""
    n = struct.unpack(">I", blob[:4])[0]
    if compressed in (True, 1):
        data = zlib.decompress(blob[4:])
    else:
        kind, body = blob[4:5], blob[5:]
        if kind == b"2":
            import bz2
            data = bz2.decompress(body)
        elif kind == b"X":
            import lzma
            data = lzma.decompress(body)
        elif kind == b"0":
            data = body
        else:
            raise TextDataError(f"janeaustenr: unknown R lazy-load compression {compressed!r}/{kind!r}")
    if len(data) != n:
        raise TextDataError(f"janeaustenr: an R object decompressed to {len(data)} bytes, expected {n}")
    return data


def austen_text(root: Path) -> str:
    """The six novels from an extracted r-cran-janeaustenr package rooted at `root`."""
    try:
        import rdata
    except ImportError:
        raise TextDataError("reading the Austen novels needs the Python package 'rdata' "
                            "(pip install rdata)") from None
    ddir = root / _AUSTEN_DIR
    rdx, rdb = ddir / "Rdata.rdx", ddir / "Rdata.rdb"
    if not rdx.is_file() or not rdb.is_file():
        raise TextDataError(f"janeaustenr: {rdx} / {rdb} not found — the package layout changed")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # rdata warns "Unknown file type: assumed RDS"
        index = rdata.read_rds(str(rdx))
        raw = rdb.read_bytes()
        variables = index["variables"]
        compressed = index.get("compressed", True)
        if hasattr(compressed, "__len__") and not isinstance(compressed, (str, bytes)):
            compressed = compressed[0]
        books = []
        for name in _AUSTEN_BOOKS:
            if name not in variables:
                raise TextDataError(f"janeaustenr: book '{name}' missing; the package has "
                                    f"{sorted(map(str, variables))}")
            off, length = (int(v) for v in variables[name])
            data = _decompress_rdb_entry(raw[off:off + length], compressed)
            lines = rdata.conversion.convert(rdata.parser.parse_data(data))
            books.append(_paragraphs(lines))
    return "\n".join(books)


# --- The Debian Administrator's Handbook (HTML) -------------------------------------------------

_HANDBOOK_DIR = "usr/share/doc/debian-handbook/html/en-US"


class _HandbookParser(html.parser.HTMLParser):
    """Collects the text of headings, paragraphs, list items and program listings; drops
    navigation, index anchors and scripts."""

    _BLOCK = {"h1", "h2", "h3", "h4", "h5", "p", "li", "pre", "dt", "dd", "td", "th", "tr", "title"}
    _SKIP = {"script", "style", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self._cur: list[str] = []
        self._skip = 0
        self._pre = 0
        self._nav = 0
        self._stack: list[tuple[str, bool]] = []

    def _flush(self):
        text = "".join(self._cur)
        self._cur = []
        if self._pre:
            text = text.strip("\n")
        else:
            text = " ".join(text.split())
        if text.strip():
            self.blocks.append(text)

    def _nav_delta(self, tag: str, attrs: dict) -> int:
        """+1 where the element starts text to drop (navigation), -1 where it starts text to keep
        inside dropped text, 0 otherwise."""
        cls = attrs.get("class") or ""
        return int(tag in ("ul", "div", "p") and ("docnav" in cls or "breadcrumbs" in cls or "toc" in cls.split()))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        cls = attrs.get("class") or ""
        nav = self._nav_delta(tag, attrs)
        if tag not in ("br", "img", "meta", "link", "hr", "input"):
            self._stack.append((tag, nav))
        self._nav += nav
        if tag in self._SKIP:
            self._skip += 1
        if tag in self._BLOCK or (tag == "div" and "para" in cls.split()):
            self._flush()
        if tag == "pre":
            self._pre += 1

    def handle_endtag(self, tag):
        if tag in ("br", "img", "meta", "link", "hr", "input"):
            return
        while self._stack:                       # tolerate unclosed tags
            t, nav = self._stack.pop()
            self._nav -= nav
            if t in self._SKIP:
                self._skip -= 1
            if t in self._BLOCK or t == "div":
                self._flush()
            if t == "pre":
                self._pre -= 1
            if t == tag:
                break

    def handle_data(self, data):
        if not self._skip and not self._nav:
            self._cur.append(data)


def handbook_text(root: Path) -> str:
    """The en-US handbook from an extracted debian-handbook package rooted at `root`, one
    HTML page after the other (sorted by file name, so the text is reproducible)."""
    hdir = root / _HANDBOOK_DIR
    pages = sorted(hdir.glob("*.html"))
    if not pages:
        raise TextDataError(f"debian-handbook: no HTML pages under {hdir} — the package layout changed")
    return _pages_text(pages, _HandbookParser)


def _pages_text(pages, parser_cls) -> str:
    """The text blocks of HTML pages, one page after the other, pages separated by a blank line."""
    out = []
    for page in pages:
        p = parser_cls()
        p.feed(page.read_text(encoding="utf-8", errors="replace"))
        p.close()
        p._flush()
        out.append("\n\n".join(p.blocks))
    return "\n\n".join(t for t in out if t.strip()) + "\n"


# --- Python source code: the CPython standard library (libpython3.11-stdlib) ---------------------

_STDLIB_GLOB = "usr/lib/python3.*"
# Generated tables and data blobs rather than code: pydoc's 750 kB of help text in one string, the
# HTML entity table, the build's sysconfig dict.
_STDLIB_SKIP = ("pydoc_data/", "html/entities.py", "_sysconfigdata")


def _code_file(text: str) -> str:
    """A source file with Unix line ends, no trailing blanks, at most two blank lines in a row
    (PEP 8's most), no blank lines at either end; indentation is kept."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out, blank = [], 0
    for ln in lines:
        blank = blank + 1 if not ln else 0
        if blank <= 2:
            out.append(ln)
    return "\n".join(out).strip("\n")


def python_stdlib_text(root: Path) -> str:
    """The pure-Python modules of an extracted libpython3.X-stdlib package rooted at `root`, one
    file after the other (sorted by path), each headed by a comment line naming it."""
    dirs = sorted(d for d in root.glob(_STDLIB_GLOB) if d.is_dir())
    files = sorted(dirs[-1].rglob("*.py")) if dirs else []
    if not files:
        raise TextDataError(f"python3-stdlib: no *.py files under {root}/{_STDLIB_GLOB} — the package "
                            f"layout changed")
    out = []
    for f in files:
        rel = f.relative_to(dirs[-1]).as_posix()
        if rel.startswith(_STDLIB_SKIP):
            continue
        code = _code_file(f.read_text(encoding="utf-8", errors="replace"))
        if code:
            out.append(f"# file: Lib/{rel}\n\n{code}")
    return "\n\n".join(out) + "\n"


# --- Technical text: the Python documentation (python3.11-doc, Sphinx HTML) ---------------------

_PYDOC_GLOB = "usr/share/doc/python3.*/html"
# The tutorial, the language and library references, the HOWTOs, the FAQs, extending/embedding and
# the glossary. Left out: the C API reference, "what's new" changelogs, installation/packaging
# pages (using/, installing/, distutils/, install/), indexes and search pages.
_PYDOC_PARTS = ("tutorial/", "reference/", "library/", "howto/", "faq/", "extending/", "glossary.html")


class _SphinxParser(_HandbookParser):
    """The handbook's block extraction, limited to the page body of Sphinx HTML (sidebars, the
    related-pages bars and the footer lie outside it) and without the "¶" permalinks."""

    def __init__(self):
        super().__init__()
        self._nav = 1                            # outside <div class="body"> nothing is kept

    def _nav_delta(self, tag: str, attrs: dict) -> int:
        cls = (attrs.get("class") or "").split()
        if tag == "div" and "body" in cls:
            return -1
        if tag == "a" and "headerlink" in cls:
            return 1
        return 0


def python_doc_text(root: Path) -> str:
    """The Python documentation from an extracted python3.X-doc package rooted at `root`: the
    pages of `_PYDOC_PARTS`, sorted by path."""
    dirs = sorted(d for d in root.glob(_PYDOC_GLOB) if d.is_dir())
    pages = []
    if dirs:
        pages = [f for f in sorted(dirs[-1].rglob("*.html"))
                 if f.relative_to(dirs[-1]).as_posix().startswith(_PYDOC_PARTS)]
    if not pages:
        raise TextDataError(f"python3-doc: no HTML pages under {root}/{_PYDOC_GLOB} — the package "
                            f"layout changed")
    return _pages_text(pages, _SphinxParser)


# --- The calibration mix ------------------------------------------------------------------------

MIX_CHARS = 3_000_000       # the mix's size (about 0.75M tokens); each part gets an equal share
MIX_CHUNK_CHARS = 4_000     # chunks end at the first paragraph break after this many characters


def _chunks(text: str, size: int) -> list[str]:
    """`text` cut at paragraph breaks ("\\n\\n") into pieces of at least `size` characters (the
    last may be shorter; a paragraph is never split)."""
    out, i, n = [], 0, len(text)
    while i < n:
        k = text.find("\n\n", i + size) if i + size < n else -1
        j = n if k < 0 else k
        piece = text[i:j].strip("\n")
        if piece.strip():
            out.append(piece)
        i = j + 2
    return out


def mix_text(parts: list[str], total: int = MIX_CHARS, chunk: int = MIX_CHUNK_CHARS) -> str:
    """Interleaves `parts` round-robin in chunks of about `chunk` characters, each part taking
    about total/len(parts) characters in chunks spread evenly over all of it (a part shorter than
    its share comes whole). Deterministic: no randomness, only the texts decide."""
    share = total // len(parts)
    picked = []
    for text in parts:
        pieces = _chunks(text, chunk)
        size = sum(map(len, pieces))
        if size <= share:
            picked.append(pieces)
            continue
        k = max(1, min(len(pieces), round(len(pieces) * share / size)))
        picked.append([pieces[(2 * i + 1) * len(pieces) // (2 * k)] for i in range(k)])
    out = []
    for i in range(max(map(len, picked))):
        out.extend(p[i] for p in picked if i < len(p))
    return "\n\n".join(out) + "\n"


# --- fetching and caching -----------------------------------------------------------------------

SOURCES: dict[str, tuple[str, Callable[[Path], str] | None]] = {
    "janeaustenr": ("r-cran-janeaustenr", austen_text),
    "python3-stdlib": ("libpython3.11-stdlib", python_stdlib_text),
    "python3-doc": ("python3.11-doc", python_doc_text),
    "debian-handbook": ("debian-handbook", handbook_text),
}

# Sources built from other sources (no package of their own): name -> the parts, in mixing order.
MIXES: dict[str, tuple[str, ...]] = {
    "calib-mix": ("janeaustenr", "python3-stdlib", "python3-doc"),
}
for _name, _parts in MIXES.items():
    SOURCES[_name] = (" + ".join(SOURCES[p][0] for p in _parts), None)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise TextDataError(f"'{cmd[0]}' is not installed: the default Debian texts need apt-get and "
                            f"dpkg-deb — pass your own text with --calib FILE (or --text FILE)") from None


def _fetch_package(package: str, workdir: Path) -> Path:
    """apt-get download + dpkg-deb -x; returns the extraction root."""
    r = _run(["apt-get", "download", package], workdir)
    if r.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        # An empty or stale package list is the usual cause; refreshing it is harmless.
        print(f"gqsa-gguf: apt-get download {package} failed; refreshing the package lists (apt-get update)")
        _run(["apt-get", "update", "-qq"], workdir)
        r = _run(["apt-get", "download", package], workdir)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if r.returncode != 0 or not debs:
        raise TextDataError(f"could not download the Debian package '{package}' (apt-get download exited "
                            f"{r.returncode}: {r.stderr.strip()[-300:]}) — run 'apt-get update' as root, "
                            f"or pass your own text with --calib FILE / --text FILE")
    root = workdir / "root"
    r = _run(["dpkg-deb", "-x", str(debs[-1]), str(root)], workdir)
    if r.returncode != 0:
        raise TextDataError(f"dpkg-deb -x {debs[-1].name} failed: {r.stderr.strip()[-300:]}")
    return root


def text_path(name: str) -> Path:
    """Path of the cached plain text of source `name` (a key of SOURCES), fetched on first use."""
    if name not in SOURCES:
        raise TextDataError(f"unknown Debian text 'debian:{name}'; known: "
                            f"{', '.join('debian:' + k for k in SOURCES)}")
    package, extract = SOURCES[name]
    out = cache_root() / "text" / f"{name}.txt"
    if out.is_file() and out.stat().st_size > 0:
        return out
    if name in MIXES:
        parts = [read_text(p) for p in MIXES[name]]
        print(f"gqsa-gguf: mixing {', '.join('debian:' + p for p in MIXES[name])} into the text "
              f"'debian:{name}' (once; cached in {out.parent})")
        text = mix_text(parts)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"gqsa-gguf: fetching Debian package {package} for the text 'debian:{name}' (once; cached "
              f"in {out.parent})")
        with tempfile.TemporaryDirectory(prefix="gqsa-deb-") as tmp:
            root = _fetch_package(package, Path(tmp))
            text = extract(root)
    if len(text.strip()) < 1000:
        raise TextDataError(f"the text extracted from {package} is only {len(text)} characters — the "
                            f"package layout changed; pass your own text with --calib FILE")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(f".tmp{os.getpid()}")
    tmp_out.write_text(text, encoding="utf-8")
    os.replace(tmp_out, out)
    return out


def read_text(name: str) -> str:
    return text_path(name).read_text(encoding="utf-8")
