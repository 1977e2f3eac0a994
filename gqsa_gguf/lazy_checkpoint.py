"""Lazy reading of a Hugging Face checkpoint's weights, one tensor or one decoder block at a time.

In:  a checkpoint folder: one or more `*.safetensors` files, with `model.safetensors.index.json`
     (`weight_map`: tensor name -> shard file) when the weights are sharded; the folder's
     `arch.DecoderLayout` for the block and top-level tensor names (`model_io.ModelInfo.layout`).
Out: `LazyCheckpoint(folder, layout)`: `names()`, `shape(name)`, `dtype(name)`, `nbytes(name)`;
     `tensor(name)` -> float32 torch tensor (a fresh copy; F16, BF16 and F32 are read, each
     converted exactly); `rows(name, start, stop)` -> rows start..stop of it; `block(i)` -> {name
     inside block i (the layout's `block_tensors`): float32 tensor}; `embeddings()`, `head(tied)`,
     `final_norm()`.

What stays in memory: a call memory-maps the shard (safetensors `safe_open`), copies the bytes of
the tensor asked for, converts them and unmaps — never a whole shard, never the whole model, and no
mapped pages left counting in the process's RSS between calls. The streamed conversion
(`streamed.StreamedModel`, issue 16) reads through this class the embeddings once per pass and each
decoder block when the pass reaches it, and the export each dense tensor, instead of
`model_io.load_model`'s float32 copy of everything.

Invariants: every name maps to exactly one shard (a name in two files without an index is refused);
`tensor(name)` equals the float32 tensor `model_io.load_model` holds under that name, bit for bit
(tested on F16, BF16 and F32 checkpoints). Errors are `LazyCheckpointError` (a `ModelError`): a
missing index shard, a tensor the checkpoint lacks, a tensor of another dtype, an unreadable file —
each message naming the file, the tensor and what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .model_io import ModelError

__all__ = ["LazyCheckpointError", "LazyCheckpoint", "INDEX_NAME", "SUPPORTED_DTYPES"]

INDEX_NAME = "model.safetensors.index.json"
SUPPORTED_DTYPES = ("F16", "BF16", "F32")          # safetensors dtype names read by `tensor`
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class LazyCheckpointError(ModelError):
    """A tensor cannot be read from a checkpoint folder; the message says which, where and why."""


def _safetensor_error():
    from safetensors import SafetensorError

    return SafetensorError


class LazyCheckpoint:
    """The weights of one checkpoint folder, read on demand (see the module docstring).

    Every read opens, maps, copies and closes (see `_open`): nothing stays mapped in between."""

    def __init__(self, folder: str | os.PathLike, layout=None):
        self.folder = Path(folder).expanduser()
        self.layout = layout
        if not self.folder.is_dir():
            raise LazyCheckpointError(f"checkpoint folder '{self.folder}' does not exist or is not a folder")
        index = self.folder / INDEX_NAME
        self._where: dict[str, Path] = self._from_index(index) if index.is_file() else self._from_files()

    # --- the name -> shard map ----------------------------------------------------------------------

    def _from_index(self, index: Path) -> dict[str, Path]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LazyCheckpointError(f"{index}: cannot read the shard index: {e}") from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in wm.items()):
            raise LazyCheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        where, missing = {}, {}
        for name, fname in wm.items():
            p = self.folder / fname
            if Path(fname).name != fname:
                raise LazyCheckpointError(f"{index}: shard '{fname}' of {name} is not a file name inside the folder")
            if not p.is_file():
                missing.setdefault(fname, []).append(name)
            where[name] = p
        if missing:
            fname, names = next(iter(sorted(missing.items())))
            raise LazyCheckpointError(
                f"{self.folder}: shard '{fname}' named by {INDEX_NAME} is missing ({len(names)} tensors, e.g. "
                f"{names[0]}){f'; {len(missing) - 1} more shard(s) missing' if len(missing) > 1 else ''} — the "
                f"download is incomplete: fetch every file of the checkpoint")
        return where

    def _from_files(self) -> dict[str, Path]:
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise LazyCheckpointError(f"{self.folder}: no *.safetensors weights (and no {INDEX_NAME})")
        where: dict[str, Path] = {}
        for p in files:
            with self._open(p) as f:
                keys = list(f.keys())
            for name in keys:
                if name in where:
                    raise LazyCheckpointError(f"{self.folder}: tensor {name} is in both {where[name].name} and "
                                              f"{p.name}, and there is no {INDEX_NAME} to say which is meant")
                where[name] = p
        return where

    def _open(self, path: Path):
        """A fresh safe_open handle. Not cached: the pages a memory map has touched count in the
        process's RSS for as long as it stays open (measured: reading the 22 blocks of a 2.3 GB
        checkpoint through kept handles grew the peak RSS by 2.0 GB), so every read maps, copies
        and unmaps."""
        from safetensors import safe_open

        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (OSError, _safetensor_error()) as e:
            raise LazyCheckpointError(f"{path}: not a readable safetensors file ({e}) — the file is "
                                      f"truncated or corrupt; fetch it again") from None

    def _read(self, name: str, fn):
        """fn(slice) on tensor `name`'s safetensors slice, inside a handle that is closed after."""
        path = self._where.get(name)
        if path is None:
            raise LazyCheckpointError(f"{self.folder}: the checkpoint has no tensor '{name}' "
                                      f"({len(self._where)} tensors, e.g. {', '.join(sorted(self._where)[:3])})"
                                      f" — it does not match its config.json, or a file is missing")
        with self._open(path) as f:
            try:
                sl = f.get_slice(name)
            except _safetensor_error() as e:
                raise LazyCheckpointError(f"{path}: {INDEX_NAME} places '{name}' in this shard, but it does not "
                                          f"hold it ({e}) — the index and the shards do not belong together") from None
            return fn(sl)

    # --- metadata -----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shard(self, name: str) -> Path:
        self._read(name, lambda sl: None)
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._read(name, lambda sl: tuple(int(d) for d in sl.get_shape()))

    def dtype(self, name: str) -> str:
        """The stored dtype, as safetensors names it: 'F16', 'BF16', 'F32', ..."""
        return self._read(name, lambda sl: str(sl.get_dtype()))

    def nbytes(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n * _DTYPE_BYTES.get(self.dtype(name), 4)

    # --- values -------------------------------------------------------------------------------------

    def _checked(self, name: str, sl):
        dt = str(sl.get_dtype())
        if dt not in SUPPORTED_DTYPES:
            raise LazyCheckpointError(f"{self._where[name]}: tensor '{name}' is stored as {dt}; gqsa-gguf reads "
                                      f"{', '.join(SUPPORTED_DTYPES)} checkpoints — re-save the model in one "
                                      f"of those (an already quantized checkpoint cannot be compressed again)")
        return sl

    def tensor(self, name: str):
        """float32 copy of one tensor (exact for F16/BF16/F32)."""
        import torch

        t = self._read(name, lambda sl: self._checked(name, sl)[:])
        return t.to(torch.float32).contiguous() if t.dtype != torch.float32 else t.contiguous()

    def rows(self, name: str, start: int, stop: int):
        """float32 copy of rows start..stop (first dimension) of one tensor; reads only those bytes."""
        import torch

        def get(sl):
            self._checked(name, sl)
            n = int(sl.get_shape()[0])
            if not 0 <= start <= stop <= n:
                raise LazyCheckpointError(f"{self._where[name]}: rows {start}..{stop} of '{name}' are outside "
                                          f"its {n} rows")
            return sl[start:stop]

        return self._read(name, get).to(torch.float32).contiguous()

    def _need_layout(self):
        if self.layout is None:
            raise LazyCheckpointError("LazyCheckpoint: block/embedding access needs the checkpoint's layout "
                                      "(LazyCheckpoint(folder, info.layout))")
        return self.layout

    def block_names(self, i: int) -> dict[str, str]:
        """{name inside the block: full HF name} of decoder block i (the layout's block_tensors)."""
        return {sub: f"model.layers.{i}.{sub}" for sub in self._need_layout().block_tensors}

    def block(self, i: int) -> dict:
        """{name inside block i, e.g. 'self_attn.q_proj.weight': float32 tensor} for every tensor of
        the layout's block; a missing one raises LazyCheckpointError."""
        return {sub: self.tensor(full) for sub, full in self.block_names(i).items()}

    def embeddings(self):
        return self.tensor("model.embed_tokens.weight")

    def final_norm(self):
        return self.tensor("model.norm.weight")

    def head(self, tied: bool):
        """The output head [vocab, hidden]: lm_head.weight, or the embeddings when `tied` (a tied
        checkpoint may omit lm_head.weight; transformers ties it to the embeddings either way)."""
        return self.embeddings() if tied else self.tensor("lm_head.weight")

    # --- lifetime -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Nothing stays open between reads; kept so the class can be used in a with-block."""

    def __enter__(self) -> "LazyCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
