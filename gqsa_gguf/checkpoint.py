"""Atomic, checksummed training checkpoints for BQPO and E2E-OQP (resumable runs).

In:  a dict of tensors / plain Python values (the payload) and a small JSON-able `meta` dict that
     identifies the run (stage, run fingerprint, progress counters).
Out: `save(path, meta, payload)` writes one file atomically; `load(path, expect)` returns
     (meta, payload) after verifying the magic, the format version, the payload's SHA-256 and that
     `meta` agrees with `expect` on every key `expect` names.

File layout (little endian):

    b"GQSACKPT" | uint32 version | uint64 header bytes | header (UTF-8 JSON) | payload
    header = {"meta": {...}, "payload_bytes": n, "payload_sha256": "..."}
    payload = torch.save(payload) bytes

Writing goes to a temporary file in the same folder, is fsync'ed, then `os.replace`d over the
target, so a crash leaves either the old or the new checkpoint, never a torn one. A torn or
foreign file is refused on load with a message saying what to do (delete it, or resume with the
same settings). `run_fingerprint` hashes what must not change between an interrupted run and its
resumption (config, calibration windows, one-shot result).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .errors import GQSAError

__all__ = ["CheckpointError", "MAGIC", "VERSION", "save", "load", "run_fingerprint"]

MAGIC = b"GQSACKPT"
VERSION = 1
_HEAD = struct.Struct("<8sIQ")
_CHUNK = 1 << 22


class CheckpointError(GQSAError, RuntimeError):
    """A checkpoint is missing, torn, corrupt, or belongs to a different run."""


def save(path: str | os.PathLike, meta: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the payload is serialized to a file of its own, hashed and copied behind the header from there:
    # never held in memory a second time (E2E-OQP's optimizer state is the largest thing it holds)
    tmps = []
    try:
        fd, body = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".payload.tmp", dir=path.parent)
        tmps.append(body)
        with os.fdopen(fd, "w+b") as pf:
            torch.save(dict(payload), pf)
            n = pf.tell()
            pf.seek(0)
            h = hashlib.sha256()
            for chunk in iter(lambda: pf.read(_CHUNK), b""):
                h.update(chunk)
            header = json.dumps({"meta": dict(meta), "payload_bytes": n, "payload_sha256": h.hexdigest()},
                                sort_keys=True).encode()
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmps.append(tmp)
            pf.seek(0)
            with os.fdopen(fd, "wb") as f:
                f.write(_HEAD.pack(MAGIC, VERSION, len(header)))
                f.write(header)
                shutil.copyfileobj(pf, f, _CHUNK)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmps.remove(tmp)
    finally:
        for t in tmps:
            try:
                os.unlink(t)
            except FileNotFoundError:
                pass


def load(path: str | os.PathLike, expect: Mapping[str, Any] | None = None,
         map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    path = Path(path)
    how = f"delete {path} to start over, or resume with the settings that wrote it"
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    # the payload is hashed and unpickled from the file, a chunk at a time: never held as bytes
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            raise CheckpointError(f"checkpoint {path} is {size} bytes, shorter than its header — torn; {how}")
        magic, version, hlen = _HEAD.unpack(head)
        if magic != MAGIC:
            raise CheckpointError(f"{path} is not a gqsa-gguf checkpoint (magic {magic!r}); {how}")
        if version > VERSION:
            raise CheckpointError(f"checkpoint {path} has version {version}, newer than this tool's {VERSION} — "
                                  f"upgrade gqsa-gguf or delete it")
        try:
            header = json.loads(f.read(min(hlen, size)).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {path}: unreadable header ({e}); {how}") from None
        start = _HEAD.size + hlen
        n = max(0, size - start)
        if n != header.get("payload_bytes"):
            raise CheckpointError(f"checkpoint {path}: payload is {n} bytes, header says "
                                  f"{header.get('payload_bytes')} — the file is truncated; {how}")
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
        if h.hexdigest() != header.get("payload_sha256"):
            raise CheckpointError(f"checkpoint {path}: SHA-256 of the payload does not match its header — "
                                  f"the file is corrupt; {how}")
        meta = header.get("meta", {})
        for key, want in (expect or {}).items():
            if meta.get(key) != want:
                raise CheckpointError(f"checkpoint {path}: {key} = {meta.get(key)!r}, but this run has "
                                      f"{want!r} — it was written by a different run; {how}")
        payload = torch.load(io.BufferedReader(_Window(f, start, n), _CHUNK), map_location=map_location,
                             weights_only=True)
    return meta, payload


class _Window(io.RawIOBase):
    """bytes [start, start + length) of an open file, as a seekable file of their own."""

    def __init__(self, f, start: int, length: int):
        super().__init__()
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self._length}[whence] + offset
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got


def run_fingerprint(*parts: Any) -> str:
    """SHA-256 (hex, 16 chars) over JSON-able values, tensors and arrays, in order."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            p = p.detach().cpu().contiguous().numpy()
        if isinstance(p, np.ndarray):
            h.update(str((p.dtype.str, p.shape)).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
