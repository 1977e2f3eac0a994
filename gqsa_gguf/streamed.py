"""The layer-streamed conversion's two ends: decoder blocks read from the checkpoint one at a time,
and the finished blocks kept compressed on disk (issue 16).

In:  a checkpoint's `model_io.ModelInfo`; the one-shot pass's `oneshot.BlockResult`s.
Out: `StreamedModel(info)`: the block source `oneshot.compress_blocks` and
     `oneshot.sensitivity_blocks` walk (`n_layers`, `layer0_inputs`, `block(i)`, as
     `oneshot.ModelBlocks` has them), `state_dict()` (a read-only mapping of every name
     `model_io.load_model`'s state dict has to its float32 tensor, read when asked: what the export
     takes its dense tensors from) and `model` (for `model_io.rope_freq_factors`);
     `BlockStore(folder)`: one checkpoint file per finished block (`put`), and a read-only mapping
     {HF linear name: `oneshot.PackedLinear`} over them, read back a block at a time (the export's
     `compressed`).

How: the transformers model is built from config.json on the meta device (no storage). The rotary
embedding is rebuilt on the CPU from the config, as from_pretrained computes it; the token
embeddings are read (`lazy_checkpoint.LazyCheckpoint`) only while `layer0_inputs` embeds the
calibration windows; block i is read when a pass enters `block(i)` and turned back into meta
tensors when it leaves. The same module classes hold the same float32 values as load_model's
(LazyCheckpoint is bit-exact with it), so a pass over a StreamedModel computes what it computes
over the loaded model, bit for bit (tests/test_streamed.py).

What stays in memory: one float32 block (and the embeddings while the windows are embedded);
a BlockStore holds one block's file at a time when read.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

from . import checkpoint as ckpt
from .lazy_checkpoint import LazyCheckpoint
from .model_io import ModelError, ModelInfo

__all__ = ["StreamedModel", "BlockStore"]


class StreamedModel:
    """A checkpoint's decoder, one float32 block at a time (see the module docstring)."""

    def __init__(self, info: ModelInfo):
        import torch
        import transformers

        self.info = info
        self.n_layers = info.n_layers
        self.ckpt = LazyCheckpoint(info.folder, info.layout)
        try:
            config = transformers.AutoConfig.from_pretrained(str(info.folder), local_files_only=True,
                                                             trust_remote_code=False)
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"{info.folder}: transformers could not build the model from config.json: {e}") from None
        model.eval()
        model.requires_grad_(False)
        inner = model.model
        rot = inner.rotary_emb
        inner.rotary_emb = type(rot)(config=model.config)          # real buffers, on the CPU
        layers = getattr(inner, "layers", None)
        if layers is None or len(layers) != info.n_layers:
            raise ModelError(f"{info.architecture}: expected model.model.layers with {info.n_layers} decoder "
                             f"layers — unsupported model structure")
        self.model, self.layers = model, layers
        self._names = list(model.state_dict().keys())

    def layer0_inputs(self, windows, bs: int):
        """What decoder layer 0 receives (oneshot.ModelBlocks.layer0_inputs), with the token
        embeddings read for the call and freed after."""
        import torch

        from .oneshot import _layer0_inputs

        emb = self.model.model.embed_tokens
        _materialize(emb, {"weight": self.ckpt.embeddings()}, "model.embed_tokens")
        try:
            return _layer0_inputs(self.model, windows, bs, device=torch.device("cpu"))
        finally:
            emb.to("meta")

    @contextlib.contextmanager
    def block(self, i: int):
        """Decoder block i in float32, read from the checkpoint; freed when the with-block ends."""
        layer = self.layers[i]
        _materialize(layer, self.ckpt.block(i), f"model.layers.{i}")
        try:
            yield layer
        finally:
            layer.to("meta")

    def state_dict(self) -> Mapping:
        """{name: float32 tensor} with the names of load_model's state dict, each read when asked
        (a tied head reads the embeddings, as transformers ties it)."""
        return _LazyStateDict(self._names, self._read)

    def _read(self, name: str):
        if name == "lm_head.weight":
            return self.ckpt.head(self.info.tie_embeddings)
        return self.ckpt.tensor(name)


def _materialize(module, state: dict, where: str) -> None:
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"{where}: the checkpoint's tensors do not fit the {type(module).__name__} that "
                         f"config.json describes ({str(e).splitlines()[0]}) — the checkpoint and its config.json "
                         f"do not belong together") from None


class _LazyStateDict(Mapping):
    def __init__(self, names: list[str], read):
        self._names, self._read = names, read

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_LINEAR_NAME = re.compile(r"model\.layers\.(\d+)\.")


class BlockStore(Mapping):
    """The one-shot pass's finished blocks, a checkpoint file per block in `folder`
    (block-00003.ckpt: the block's linears as gqsa4 rows and their relative output errors, and after
    training their float scales and zeros; written
    atomically, checked on read by checkpoint.load), read back as a mapping {HF linear name:
    oneshot.PackedLinear}. `fingerprint` ties the files to one run: a file of another run is
    refused when read. The last block read is kept, so reading a block's linears in order reads
    its file once."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str, n_layers: int, linears: tuple[str, ...]):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.n_layers = n_layers
        self.linears = tuple(linears)              # linear names inside a block (the layout's)
        self._cache: tuple[int, dict] | None = None

    def path(self, i: int) -> Path:
        return self.folder / f"block-{i:05d}.ckpt"

    def put(self, res, qparams: dict | None = None) -> None:
        """Writes one oneshot.BlockResult; `qparams` {linear name: (scale, zero)}: the float32 scales
        and zero points a training stage left (the rows hold them rounded to fp16 and integers)."""
        import torch

        from .oneshot import PackedLinear

        packed = {n: PackedLinear.of(cl) for n, cl in res.linears.items()}
        ckpt.save(self.path(res.index), {"stage": "oneshot-block", "fingerprint": self.fingerprint, "block": res.index},
                  {"linears": {n: {"width": p.width, "bits": p.bits, "data": torch.from_numpy(p.data)}
                               for n, p in packed.items()},
                   "rel_errors": dict(res.rel_errors), "qparams": dict(qparams or {})})

    def _load(self, i: int) -> dict:
        from .oneshot import PackedLinear

        if self._cache is None or self._cache[0] != i:
            self._cache = None
            _, payload = ckpt.load(self.path(i), expect={"stage": "oneshot-block", "fingerprint": self.fingerprint,
                                                         "block": i})
            linears = {n: PackedLinear(n, int(v["width"]), v["data"].numpy(), int(v.get("bits", 4)))
                       for n, v in payload["linears"].items()}
            self._cache = (i, {"linears": linears, "rel_errors": payload["rel_errors"],
                               "qparams": payload.get("qparams", {})})
        return self._cache[1]

    def qparams(self, name: str):
        """(scale, zero) float32 of a linear as a training stage left them, or (None, None) when the
        block's file holds only the rows (the one-shot's)."""
        i = self._block_of(name)
        if i is None:
            raise KeyError(name)
        return self._load(i)["qparams"].get(name, (None, None))

    def complete(self, upto: int) -> bool:
        """Whether the files of blocks 0..upto-1 are all there (their content is checked when read)."""
        return all(self.path(i).is_file() for i in range(upto))

    def _block_of(self, name) -> int | None:
        m = _LINEAR_NAME.match(name) if isinstance(name, str) else None
        if m is None or int(m.group(1)) >= self.n_layers or name[m.end():] not in self.linears:
            return None
        return int(m.group(1))

    def __contains__(self, name) -> bool:                  # by the name alone: reads no file
        return self._block_of(name) is not None

    def __getitem__(self, name: str):
        i = self._block_of(name)
        if i is None:
            raise KeyError(name)
        return self._load(i)["linears"][name]

    def __iter__(self):
        return (f"model.layers.{i}.{lin}" for i in range(self.n_layers) for lin in self.linears)

    def __len__(self) -> int:
        return self.n_layers * len(self.linears)
