"""Real English text from Debian packages, extracted to plain text and cached.

No model hub or dataset hub is reachable from our machines, but Debian's package archive is, so
the project's default texts come from two Debian packages with unrelated content:

    calibration  "debian:janeaustenr"      Jane Austen's six novels (r-cran-janeaustenr, R data)
    evaluation   "debian:debian-handbook"  The Debian Administrator's Handbook, en-US (HTML)

Calibrating on 19th-century fiction and evaluating on a technical manual keeps the evaluation
honest: nothing the compressor saw is in the evaluation text.

In:  a source name from `SOURCES`.
Out: `text_path(name)` -> Path of a UTF-8 plain-text file (cached under cache_root()/text);
     `read_text(name)` -> its content. Paragraphs are separated by one blank line.

Fetching uses `apt-get download` + `dpkg-deb -x` into a temporary folder (no root install); a
failure says which command failed and how to get around it (`--calib FILE`).
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

__all__ = ["SOURCES", "TextDataError", "text_path", "read_text", "austen_text", "handbook_text"]


class TextDataError(RuntimeError):
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

    def handle_starttag(self, tag, attrs):
        cls = dict(attrs).get("class") or ""
        nav = tag in ("ul", "div", "p") and ("docnav" in cls or "breadcrumbs" in cls or "toc" in cls.split())
        if tag not in ("br", "img", "meta", "link", "hr", "input"):
            self._stack.append((tag, nav))
        if nav:
            self._nav += 1
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
            if nav:
                self._nav -= 1
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
    out = []
    for page in pages:
        p = _HandbookParser()
        p.feed(page.read_text(encoding="utf-8", errors="replace"))
        p.close()
        p._flush()
        out.append("\n\n".join(p.blocks))
    return "\n\n".join(t for t in out if t.strip()) + "\n"


# --- fetching and caching -----------------------------------------------------------------------

SOURCES: dict[str, tuple[str, Callable[[Path], str]]] = {
    "janeaustenr": ("r-cran-janeaustenr", austen_text),
    "debian-handbook": ("debian-handbook", handbook_text),
}


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
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"gqsa-gguf: fetching Debian package {package} for the text 'debian:{name}' (once; cached in "
          f"{out.parent})")
    with tempfile.TemporaryDirectory(prefix="gqsa-deb-") as tmp:
        root = _fetch_package(package, Path(tmp))
        text = extract(root)
    if len(text.strip()) < 1000:
        raise TextDataError(f"the text extracted from {package} is only {len(text)} characters — the "
                            f"package layout changed; pass your own text with --calib FILE")
    tmp_out = out.with_suffix(f".tmp{os.getpid()}")
    tmp_out.write_text(text, encoding="utf-8")
    os.replace(tmp_out, out)
    return out


def read_text(name: str) -> str:
    return text_path(name).read_text(encoding="utf-8")
