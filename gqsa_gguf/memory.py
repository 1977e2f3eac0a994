"""How much memory each conversion stage holds, estimated before any weight is read.

In:  a checkpoint's `model_io.ModelInfo` (sizes from config.json), the settings that matter
     (`MemorySettings`: calibration windows, lengths, batch sizes, training epochs, sparsity), the
     checkpoint's size on disk.
Out: `estimate(info, settings, pipeline)` -> `Estimate`: one `Stage` per conversion stage with its
     named terms in bytes, and the peak; `check(...)` -> `Verdict` (fits, or a message naming the
     stage, the estimate, the memory available and settings that would fit); `check_convert(cfg)`
     does that for a `ConvertConfig` and raises `MemoryCheckError` (the CLI's refusal up front);
     `available_memory()` -> bytes (MemAvailable, lowered by a cgroup limit).

Three pipelines are estimated:
  * "whole-model": the converter before issue 16 (kept as the reference the streamed one is
    measured against) — the float32 model (`model_io.load_model`), a second float32 copy when BQPO
    or E2E-OQP train (their targets and teacher), BQPO's own deep copy, E2E-OQP's dense fake-quant
    weights kept for the backward pass.
  * "streamed": the layer-streamed conversion of issue 16, what `pipeline.convert` runs: one
    float32 block from `lazy_checkpoint.LazyCheckpoint` at a time, the calibration activations and
    the OBS working set in the one-shot passes, the finished blocks on disk; BQPO a float block and
    its trained copy with the two chains; E2E-OQP (streamed_train.py) the float model's final
    hidden states from a streamed float pass ("teacher"), then only scales/zero points with their
    optimizer state, the frozen codes two to a byte expanded one linear at a time under
    activation checkpointing, the embeddings, head and norms; the export holding the file's tensors.
    When the float model writes turns of E2E-OQP's chat windows (--e2e-chat-replies model or
    self) it is loaded whole for that, before the teacher pass, and freed ("chat").
  * "streamed-oneshot": the streamed sensitivity and one-shot stages, then the whole float32 model
    loaded for BQPO and E2E-OQP (the whole-model pipeline's load, training and export stages):
    `pipeline.train` on a model in memory after a streamed one-shot (what the converter did
    for --e2e-chat-replies model until the generation stage above; kept for comparison).
`converter_pipeline(settings)` names the one the converter runs, and `check_convert` checks it.

The terms are written out in docs/DESIGN.md ("Memory: what each stage holds"). Calibration
(`RUNTIME_BYTES`, `LOAD_RESIDUE`, `LOGIT_COPIES`, `OVERHEAD`): peak RSS measured with
/usr/bin/time -v — SmolLM2-135M at the defaults 4.4 GB; a 1.3B LLaMA-shaped F16 checkpoint (hidden
2048, 22 layers, FFN 5632, tied 152k vocabulary) with --nsamples 8 --seqlen 256 --bqpo-epochs 1
--e2e-epochs 1: 17.5 GB in one-shot, > 23.2 GB (killed) at the start of E2E-OQP; and the smaller
runs listed in DESIGN.md. The estimate is meant to err high by up to ~25 %, never low by much.

Nothing here imports torch or reads weights: it runs in milliseconds before the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from . import format as fmt
from .errors import GQSAError

__all__ = ["MemoryCheckError", "MemorySettings", "ModelSizes", "Stage", "Estimate", "Verdict", "model_sizes",
           "estimate", "e2e_micro_batch", "e2e_checkpointing", "e2e_moments", "converter_pipeline", "check", "check_convert", "available_memory", "PIPELINES", "GB"]

GB = 1e9                               # messages print decimal GB, as /usr/bin/time's kB / 1e6
PIPELINES = ("whole-model", "streamed", "streamed-oneshot")
F32 = 4

# --- calibration constants (see the module docstring and docs/DESIGN.md) --------------------------
RUNTIME_BYTES = int(0.45e9)   # Python + torch + transformers + tokenizer + tokenized calibration text: 0.40 GB measured
LOAD_RESIDUE = 1.0            # float32 model copies' worth of heap the load leaves resident (measured)
TRAIN_RESIDUE = 0.5           # ... and what the freed one-shot model and BQPO's swapped-out linears leave
LOGIT_COPIES = 7              # [micro, seqlen, vocab] float32 tensors alive in a KD step (student and
                              # teacher logits, log-softmaxes, their product, the gradient)
BQPO_RESIDUE = 1.5            # float32 blocks' worth of heap the streamed BQPO's steps leave resident
                              # (measured: RSS grows 0.24 GB over a 1B-wide block's first 8 steps)
OVERHEAD = 1.10               # allocator slack on top of the live tensors
SLAB_BYTES = 8 << 23          # the float64 slabs the K x K helpers work in (saliency._SLAB elements)
PROBE_GROUPS = (3, 1, 2, 1)   # linears per input group, in the order of arch.INPUT_GROUPS / LINEARS
HEADROOM = 0.92               # use at most this share of the available memory
# per token and decoder layer, the float32 activations autograd keeps for the backward pass, in
# units of (hidden, ffn, heads x seqlen): norm in/out, q/k/v, rotated q/k, attention out, residuals;
# gate, up, silu(gate), their product; the attention probabilities (CPU: math path)
SAVED_PER_TOKEN = (10, 4, 1)
# E2E-OQP's memory-for-time choices under "auto": every layer's activations kept (no
# checkpointing) when that costs at most this much more, AdamW's moments in bf16 when that saves
# more than this (e2e_checkpointing, e2e_moments)
E2E_MEMORY_ALLOWANCE = 1 << 30
# the streamed E2E-OQP's frozen part (fakequant.PackedGQSLinear): 4-bit codes two to a byte and an
# int16 group index / 16 (its scale and zero are the fp32 trainable parameters)
FROZEN_BYTES_PER_KEPT = 0.5 + 2 / 16
# CompressedLinear (q uint8, indices int32, z uint8, d fp16)
ONESHOT_BYTES_PER_KEPT = 1 + 4 / 16 + 1 / 16 + 2 / 16
# the whole-model E2E-OQP's fakequant.FrozenGQSLinear (q uint8, indices int64, fp32 scale and zero)
PACKED_BYTES_PER_KEPT = 1 + 8 / 16 + 8 / 16
# The defaults of the training configs (bqpo.BQPOConfig.batch_size, e2e.E2EConfig.micro_batch): the
# CLI does not change them; a test checks they agree.
BQPO_BATCH = 1
E2E_MICRO_BATCH = 1
E2E_BATCH = 2


class MemoryCheckError(GQSAError, RuntimeError):
    """A conversion would not fit in the available memory; the message says which stage, the
    estimate, and the settings that would fit."""


@dataclass(frozen=True)
class MemorySettings:
    """The settings the estimate depends on (a subset of ConvertConfig, seqlen already clipped)."""

    nsamples: int = 128
    seqlen: int = 512
    batch_size: int = 8                # calibration windows per forward (one-shot, allocation)
    bqpo_epochs: int = 0
    e2e_epochs: int = 3
    sparsity: float = 0.5
    allocation: str = "sensitivity"
    bqpo_batch: int = BQPO_BATCH
    e2e_micro_batch: int = E2E_MICRO_BATCH
    e2e_batch: int = E2E_BATCH         # windows per optimizer step
    e2e_step_in_backward: bool = True  # AdamW stepped from the gradient hooks (E2EConfig.step_in_backward)
    e2e_moments: str = "fp32"          # AdamW's moments between steps (E2EConfig.moments; "auto": e2e_moments)
    e2e_checkpointing: str = "auto"    # the streamed E2E-OQP's layer checkpointing (E2EConfig.checkpointing)
    train_on_host: bool = True         # False: BQPO / E2E-OQP run on a GPU (--device cuda), not counted here
    e2e_windows: int = 0               # E2E-OQP's training windows (--e2e-windows); 0: the nsamples windows
    e2e_seqlen: int = 0                # their tokens each (--e2e-seqlen, clipped); 0: seqlen
    chat_share: float = 0.0            # share of E2E-OQP's windows that are chat windows (--e2e-chat-share)
    chat_replies: str = "text"         # who writes their turns (--e2e-chat-replies; "auto": chat_replies)
    bits: int = fmt.BITS               # the code width (--gqsa wN...): the packed rows' block size

    @classmethod
    def from_config(cls, cfg, info=None, device: str | None = None) -> "MemorySettings":
        seqlen = cfg.calib.seqlen if info is None else min(cfg.calib.seqlen, info.context_length)
        e2e_seqlen = cfg.e2e.seqlen if info is None else min(cfg.e2e.seqlen, info.context_length)
        c = cfg.compression
        device = cfg.e2e.device if device is None else device
        return cls(nsamples=cfg.calib.nsamples, seqlen=seqlen, batch_size=cfg.calib.batch_size,
                   bqpo_epochs=cfg.bqpo.epochs, e2e_epochs=cfg.e2e.epochs, sparsity=c.sparsity,
                   allocation=c.allocation, train_on_host=str(device) == "cpu", e2e_windows=cfg.e2e.windows,
                   e2e_seqlen=e2e_seqlen,
                   e2e_micro_batch=cfg.e2e.micro_batch, e2e_batch=cfg.e2e.batch_size,
                   e2e_step_in_backward=cfg.e2e.step_in_backward, e2e_moments=cfg.e2e.moments,
                   e2e_checkpointing=cfg.e2e.checkpointing,
                   chat_share=float(cfg.e2e.chat_share), chat_replies=cfg.e2e.chat_replies, bits=c.bits)

    @property
    def row_bytes_per_kept(self) -> float:
        """Bytes a kept weight takes in the packed rows (oneshot.PackedLinear, the GGUF): one block
        of the file's type (gqsa4 12 bytes, gqsa3 10) per kept group of 16."""
        return fmt.gqsa_type(self.bits).block_bytes / fmt.GROUP_SIZE

    @property
    def writes_chat(self) -> bool:
        """The float model writes turns of E2E-OQP's chat windows ("auto" resolved: chat_replies)."""
        return bool(self.e2e_epochs and self.chat_share and self.chat_replies in ("model", "self"))

    @property
    def e2e_len(self) -> int:
        """Tokens of one E2E-OQP training window."""
        return self.e2e_seqlen or self.seqlen

    @property
    def e2e_tokens(self) -> int:
        """Tokens of E2E-OQP's training windows."""
        return (self.e2e_windows or self.nsamples) * self.e2e_len


@dataclass(frozen=True)
class ModelSizes:
    """Element counts of a checkpoint, from its config alone."""

    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    vocab: int
    q_dim: int                          # n_head * head_dim
    kv_dim: int                         # n_head_kv * head_dim
    block: int                          # every tensor of one decoder block
    block_linear: int                   # its seven compressed linears
    linear_shapes: tuple                # ((rows, width), ...) of one block's linears
    embed: int                          # vocab x hidden
    head: int                           # 0 when tied
    total: int                          # what load_model holds

    @property
    def linear(self) -> int:
        return self.n_layers * self.block_linear


def model_sizes(info) -> ModelSizes:
    """ModelSizes of a ModelInfo (or anything with its attributes and a `layout`)."""
    layout = info.layout
    shapes = tuple(layout.linear_shape(info, lin) for lin in layout.linears)
    lin = sum(n * k for n, k in shapes)
    rest = 0
    for sub in layout.block_tensors:                   # norms, biases, per-head norms
        mod, _, kind = sub.rpartition(".")
        if mod in layout.linears:
            rest += layout.linear_shape(info, mod)[0] if kind == "bias" else 0
        elif mod.endswith(("q_norm", "k_norm")):
            rest += info.head_dim
        else:
            rest += info.hidden_size
    embed = info.vocab_size * info.hidden_size
    head = 0 if info.tie_embeddings else embed
    block = lin + rest
    return ModelSizes(n_layers=info.n_layers, hidden=info.hidden_size, ffn=info.intermediate_size,
                      n_head=info.n_head, vocab=info.vocab_size, q_dim=info.n_head * info.head_dim,
                      kv_dim=info.n_head_kv * info.head_dim, block=block, block_linear=lin,
                      linear_shapes=shapes, embed=embed, head=head,
                      total=embed + head + info.n_layers * block + info.hidden_size)


@dataclass(frozen=True)
class Stage:
    name: str
    terms: dict = field(default_factory=dict)          # what -> bytes (before OVERHEAD)

    @property
    def total(self) -> int:
        return int(sum(self.terms.values()) * OVERHEAD)


@dataclass(frozen=True)
class Estimate:
    pipeline: str
    settings: MemorySettings
    stages: tuple

    @property
    def peak(self) -> Stage:
        return max(self.stages, key=lambda s: s.total)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def format(self) -> str:
        lines = [f"memory estimate ({self.pipeline} pipeline), GB:"]
        for s in self.stages:
            top = sorted(s.terms.items(), key=lambda kv: -kv[1])[:4]
            lines.append(f"  {s.name:<10} {s.total / GB:7.2f}  (" + ", ".join(f"{k} {v / GB:.2f}" for k, v in top) + ")")
        return "\n".join(lines)


# --- the terms -----------------------------------------------------------------------------------

def _forward_temps(z: ModelSizes, tokens: int, seqlen: int) -> int:
    """float32 temporaries of one block's forward on `tokens` tokens (windows of `seqlen`)."""
    per_token = 6 * z.hidden + 2 * z.q_dim + 2 * z.kv_dim + 3 * z.ffn + z.n_head * seqlen
    return tokens * per_token * F32


def _saved_for_backward(z: ModelSizes, tokens: int, seqlen: int) -> int:
    """float32 activations one decoder layer keeps for the backward pass on `tokens` tokens."""
    h, f, a = SAVED_PER_TOKEN
    return tokens * (h * z.hidden + f * z.ffn + a * z.n_head * seqlen) * F32


def _obs_working_set(z: ModelSizes) -> int:
    """The one-shot pass on the widest input (oneshot.compress_linear_obs): while U is made, the
    input group's Hessian and two more K x K float64 matrices (its dampened copy, Cholesky factor,
    inverse: each freed as the next exists, 24 K^2 bytes); then H, U and H in float32 (16 K^2)
    with W0, W, the codes and the error terms (5 N x K float32)."""
    return max(max(3 * 8 * k * k, 16 * k * k + 5 * F32 * n * k) for n, k in z.linear_shapes)


def _probe_working_set(z: ModelSizes) -> int:
    """The sensitivity probe on one block (oneshot.sensitivity_block): the four input groups'
    float64 Hessians from its dense pass, and the most that comes beside them. In the dense pass:
    the widest input's float32 X^T X, widened into its Hessian a slab at a time. Then group by
    group (q/k/v, o_proj, gate/up, down_proj): its Hessian is factored in its own memory and
    diag(H^-1) solved a slab of columns at a time (three slabs), the factor is dropped, and each of
    its linears is rounded at every level — its saliency (N x K float64), its weights' copy and the
    rounded weights (two N x K float32) — beside the Hessians of the groups still to come. No
    K x K float64 matrix beside the Hessians: no copy, factor or inverse of one."""
    shapes = list(z.linear_shapes)
    groups, at = [], 0
    for size in PROBE_GROUPS:
        groups.append(shapes[at:at + size])
        at += size
    widths = [g[0][1] for g in groups]

    def slab(k):                                        # at most K x K
        return min(SLAB_BYTES, 8 * k * k)

    kmax = max(widths)
    phases = [8 * sum(k * k for k in widths) + F32 * kmax ** 2 + slab(kmax)]
    for g, lins in enumerate(groups):
        later = 8 * sum(k * k for k in widths[g + 1:])
        phases += [later + 8 * widths[g] ** 2 + 3 * slab(widths[g]), later + max(16 * n * k for n, k in lins)]
    return max(phases)


def _block_adam(z: ModelSizes, s: MemorySettings) -> int:
    """BQPO on one block: the kept float weights, scales and zeros with gradient and two AdamW moments."""
    kept = (1 - s.sparsity) * z.block_linear
    return int(kept * (1 + 2 / 16) * F32 * 4)


def _whole_model(z: ModelSizes, s: MemorySettings, ckpt_bytes: int) -> list[Stage]:
    model = z.total * F32
    trains = s.bqpo_epochs > 0 or s.e2e_epochs > 0
    acts = s.nsamples * s.seqlen * z.hidden * F32          # all windows' hidden states at one block
    batch_tokens = min(s.batch_size, s.nsamples) * s.seqlen
    base = {"runtime": RUNTIME_BYTES, "windows": s.nsamples * s.seqlen * 8}
    resident = {**base, "model f32": model, "load residue": int(LOAD_RESIDUE * model)}
    kept = (1 - s.sparsity) * z.linear
    stages = [Stage("load", {**base, "model f32": model, "checkpoint mapped": ckpt_bytes})]
    one = {**resident, "activations in/out": 2 * acts, "block forward": _forward_temps(z, batch_tokens, s.seqlen),
           "one-shot working set": _obs_working_set(z)}
    if trains:
        one["float copy (targets)"] = model
    if s.allocation == "sensitivity":
        one["activations in/out"] += acts                  # the probe keeps the dense outputs too
    stages.append(Stage("one-shot", one))
    if s.bqpo_epochs > 0 and s.train_on_host:
        stages.append(Stage("bqpo", {
            **resident, "quant copy": model, "activation caches": 2 * acts,
            "block training": _block_adam(z, s) + _saved_for_backward(z, s.bqpo_batch * s.seqlen, s.seqlen)
            + _forward_temps(z, s.bqpo_batch * s.seqlen, s.seqlen),
            "one-shot result": int(kept * ONESHOT_BYTES_PER_KEPT)}))
    if s.e2e_epochs > 0 and s.train_on_host:
        tokens = s.e2e_micro_batch * s.e2e_len
        stages.append(Stage("e2e", {
            **resident, "freed copies' heap": int(TRAIN_RESIDUE * model), "student (dense parts)": (z.total - z.linear) * F32,
            "student packed linears": int(kept * PACKED_BYTES_PER_KEPT),
            "scale/zero grad + AdamW": int(kept / 16 * 2 * F32 * 3),
            "dense fake-quant weights": z.linear * F32,
            "activations for backward": z.n_layers * _saved_for_backward(z, tokens, s.e2e_len),
            "logits": LOGIT_COPIES * tokens * z.vocab * F32}))
    stages.append(Stage("export", {**resident, "compressed": int(kept * ONESHOT_BYTES_PER_KEPT),
                                   "dense tensor conversion": z.embed * (F32 + 2)}))
    return stages


def _streamed_oneshot(z: ModelSizes, s: MemorySettings) -> list[Stage]:
    """The streamed sensitivity and one-shot passes (pipeline._oneshot_streamed): one float32 block
    and the activations; the embeddings only while the windows are embedded, the finished blocks
    on disk."""
    acts = s.nsamples * s.seqlen * z.hidden * F32
    base = {"runtime": RUNTIME_BYTES, "windows": s.nsamples * s.seqlen * 8}
    block = z.block * F32
    kept_block = (1 - s.sparsity) * z.block_linear
    stages = [Stage("embed", {**base, "embeddings f32": z.embed * F32, "activations": acts})]
    if s.allocation == "sensitivity":
        tokens = min(4, s.nsamples) * s.seqlen                            # the probe's batch
        stages.append(Stage("sensitivity", {
            **base, "block f32": block, "activations": 3 * acts,         # inputs, dense outputs, probe
            "block forward": _forward_temps(z, tokens, s.seqlen), "probe working set": _probe_working_set(z)}))
    tokens = min(s.batch_size, s.nsamples) * s.seqlen
    stages.append(Stage("one-shot", {
        **base, "block f32": block, "activations": 2 * acts, "block forward": _forward_temps(z, tokens, s.seqlen),
        "one-shot working set": _obs_working_set(z),
        "one block compressed": int(kept_block * (ONESHOT_BYTES_PER_KEPT + s.row_bytes_per_kept))}))
    return stages


def _streamed(z: ModelSizes, s: MemorySettings, ckpt_bytes: int) -> list[Stage]:
    """The streamed pipeline: the one-shot passes, BQPO and E2E-OQP of streamed_train.py, the export."""
    acts = s.nsamples * s.seqlen * z.hidden * F32
    kept = (1 - s.sparsity) * z.linear
    kept_block = (1 - s.sparsity) * z.block_linear
    block = z.block * F32
    base = {"runtime": RUNTIME_BYTES, "windows": s.nsamples * s.seqlen * 8}
    stages = _streamed_oneshot(z, s)
    widest = max(n * k for n, k in z.linear_shapes)
    if s.bqpo_epochs > 0 and s.train_on_host:
        # streamed_train.run_bqpo_streamed: the float block read and its copy being trained (its
        # linears become GQSLinear: the kept weights with their AdamW state, _block_adam), the float
        # and compressed chains, one block's one-shot and trained rows
        tokens = s.bqpo_batch * s.seqlen
        stages.append(Stage("bqpo", {
            **base, "block f32 (float + trained copy)": 2 * block, "chains (float, compressed)": 2 * acts,
            "block training": _block_adam(z, s) + _saved_for_backward(z, tokens, s.seqlen)
            + _forward_temps(z, max(tokens, min(s.bqpo_batch, s.nsamples) * s.seqlen), s.seqlen),
            # GQSLinear's autograd graph: each linear's dense weight and two kept-group-sized
            # intermediates saved for the backward; in the backward, on the widest linear, the
            # dense weight's gradient (bf16 and float32), the kept groups' and the chain-rule
            # products (~14 bytes a weight); AdamW's foreach temporary (one more kept weights' copy)
            "fake-quant graph": int(z.block_linear * F32 * (1 + 2 * (1 - s.sparsity)) + 14 * widest),
            "AdamW temporaries": int(kept_block * F32),
            "heap residue": int(BQPO_RESIDUE * block),
            "one block compressed": int(kept_block * (2 * ONESHOT_BYTES_PER_KEPT + 2 * s.row_bytes_per_kept))}))
    if s.writes_chat:
        stages.append(_chat_stage(z, s))
    if s.e2e_epochs > 0 and s.train_on_host:
        e2e_acts = s.e2e_tokens * z.hidden
        batch_tokens = min(s.batch_size, s.e2e_windows or s.nsamples) * s.e2e_len
        # streamed_train.float_final_hidden: the float chain over E2E-OQP's windows, one block read
        # at a time, and the final hidden states it keeps (fp16)
        stages.append(Stage("teacher", {
            **base, "embeddings f32": z.embed * F32, "float chain f32": e2e_acts * F32,
            "final hidden f16": e2e_acts * 2, "block f32": block,
            "block forward": _forward_temps(z, batch_tokens, s.e2e_len)}))
        stages.append(_streamed_e2e(z, s, e2e_micro_batch(z, s), e2e_checkpointing(z, s)))
    # the export (pipeline.convert without training): the GGUF writer holds every tensor of the
    # file until it writes (gqsa rows, F16 embeddings and head); the dense tensors are read one
    # at a time, the blocks one block file at a time
    stages.append(Stage("export", {
        "runtime": RUNTIME_BYTES, "gqsa rows": int(kept * s.row_bytes_per_kept),
        "embeddings + head f16": (z.embed + z.head) * 2, "one tensor read f32": max(z.embed, z.head) * F32,
        "one block file": int((1 - s.sparsity) * z.block_linear * (s.row_bytes_per_kept + ONESHOT_BYTES_PER_KEPT))}))
    return stages


CHAT_BATCH = 32                        # conversations generated at a time (calib.model_replies)
CHAT_TOKENS = 64 + 128 + 64            # their longest generation: template, question, answer


def _chat_stage(z: ModelSizes, s: MemorySettings) -> Stage:
    """pipeline._with_chat_windows with the float model writing turns: the whole float32 model
    (load_model, with the heap its load leaves), a batch's key/value cache and logits; on a GPU
    only the load passes through the host."""
    model = z.total * F32
    tokens = CHAT_BATCH * CHAT_TOKENS
    terms = {"runtime": RUNTIME_BYTES, "windows": s.nsamples * s.seqlen * 8, "model f32": model,
             "load residue": int(LOAD_RESIDUE * model)}
    if s.train_on_host:
        terms["generation (kv cache, logits)"] = 2 * z.n_layers * tokens * z.kv_dim * F32 + 4 * CHAT_BATCH * z.vocab * F32
    return Stage("chat", terms)


def chat_replies(info_or_sizes, s: MemorySettings) -> str:
    """Who writes the turns of E2E-OQP's chat windows: `s.chat_replies`, or for "auto" "self" (the
    float model writes the questions and the answers, calib.model_questions / model_replies) where
    loading the float model for it does not raise the conversion's peak above its other stages
    (SmolLM2-135M at the defaults: 2.1 GB against 3.0 GB; measured 1.47 GB), else "text" (a 1B or
    7B shape: the float model alone is several GB more than the streamed conversion holds).
    Measured on SmolLM2, self-written chat windows cut the divergence from the float model's
    answers to held-out questions by 13 % for 0.7 % more plain-text perplexity (docs/DESIGN.md)."""
    if s.chat_replies != "auto":
        return s.chat_replies
    z = _sizes(info_or_sizes)
    others = max(st.total for st in _streamed(z, replace(s, chat_replies="text"), 0))
    return "self" if _chat_stage(z, replace(s, chat_replies="self")).total <= others else "text"


def _streamed_e2e(z: ModelSizes, s: MemorySettings, micro: int, checkpointed: bool = True) -> Stage:
    """The streamed E2E-OQP (streamed_train.run_e2e_streamed) with `micro` windows per backward,
    its decoder layers under activation checkpointing or (`checkpointed` False) keeping every
    layer's activations for the backward."""
    base = {"runtime": RUNTIME_BYTES, "windows": s.nsamples * s.seqlen * 8}
    kept = (1 - s.sparsity) * z.linear
    widest = max(n * k for n, k in z.linear_shapes)
    e2e_acts = s.e2e_tokens * z.hidden
    tokens = micro * s.e2e_len
    qparams = _qparam_bytes(z, s)
    # e2e.ParamStepper: AdamW's two moments per scale and zero (fp32, or bf16 between steps); the
    # gradients: all of them when one step follows the backward (or micro-batches accumulate into
    # them), else only the linear whose backward just ran, stepped and freed by its hooks (its
    # scale's and zero's, and under bf16 moments their two moments upcast for the step)
    bf16 = e2e_moments(z, s) == "bf16"
    moments = 2 * qparams // (2 if bf16 else 1)
    hooked = s.e2e_step_in_backward and micro >= s.e2e_batch
    widest_qparams = int((1 - s.sparsity) * widest / 16 * 2 * F32)
    terms = {
        **base, "embeddings f32": z.embed * F32,
        "head + norms + biases f32": (z.head + z.n_layers * (z.block - z.block_linear) + z.hidden) * F32,
        "frozen codes + indices": int(kept * FROZEN_BYTES_PER_KEPT), "scale/zero": qparams,
        # e2e.ckpt is written from the parameters themselves, and checkpoint.save streams it to
        # disk: no copy
        "AdamW moments": moments,
        "scale/zero grad": widest_qparams * (2 if bf16 else 1) if hooked else qparams,
        "teacher final hidden f16": e2e_acts * 2,
        # a linear's dense weight expanded, its gradient and the kept groups' (fakequant.
        # PackedGQSLinear: never saved, one at a time)
        "dense weight + gradient": 3 * widest * F32,
        "logits": LOGIT_COPIES * tokens * z.vocab * F32,
        # under bf16 autocast (--amp auto on a CPU with AMX) the head's weight is cast for the
        # student (saved for its backward) and for the teacher's logits
        "head cast (autocast)": 2 * 2 * z.vocab * z.hidden}
    if checkpointed:
        # each layer's input, and one layer's forward recomputed for its backward
        terms["checkpointed layer inputs"] = z.n_layers * tokens * z.hidden * F32
        terms["one layer recomputed"] = _saved_for_backward(z, tokens, s.e2e_len)
    else:
        terms["every layer's activations"] = z.n_layers * _saved_for_backward(z, tokens, s.e2e_len)
    return Stage("e2e", terms)


def _sizes(info_or_sizes) -> ModelSizes:
    return info_or_sizes if isinstance(info_or_sizes, ModelSizes) else model_sizes(info_or_sizes)


def _qparam_bytes(z: ModelSizes, s: MemorySettings) -> int:
    """E2E-OQP's trainable quantization parameters: one fp32 scale and zero per kept group."""
    return int((1 - s.sparsity) * z.linear / 16 * 2 * F32)


def e2e_moments(info_or_sizes, s: MemorySettings) -> str:
    """E2E-OQP's AdamW moments between steps: `s.e2e_moments` "fp32" / "bf16", or "auto": bf16
    where that saves more than E2E_MEMORY_ALLOWANCE (the fp32 moments take twice the scales and
    zeros: a 7B shape at W4S50 3.2 GB, bf16 saves 1.6 GB), else fp32 (SmolLM2-135M: 34 MB saved).
    On SmolLM2 bf16 moments changed the perplexity by 0.4 % (docs/DESIGN.md), within run-to-run
    differences."""
    if s.e2e_moments != "auto":
        return s.e2e_moments
    z = _sizes(info_or_sizes)
    return "bf16" if _qparam_bytes(z, s) > E2E_MEMORY_ALLOWANCE else "fp32"


def e2e_checkpointing(info_or_sizes, s: MemorySettings) -> bool:
    """Whether the streamed E2E-OQP runs its decoder layers under activation checkpointing
    (pipeline._train_streamed): `s.e2e_checkpointing` "on" / "off", or "auto": off when keeping
    every layer's activations costs at most E2E_MEMORY_ALLOWANCE more than checkpointing
    (SmolLM2-135M at the defaults: 0.9 GB; a 1B or 7B shape: several GB, checkpointed). Without
    it the backward recomputes no forward: a step is about a fifth shorter (docs/DESIGN.md). The
    trained values are the same either way (the same operations, not repeated)."""
    if s.e2e_checkpointing != "auto":
        return s.e2e_checkpointing == "on"
    z = _sizes(info_or_sizes)
    micro = e2e_micro_batch(z, s)
    extra = _streamed_e2e(z, s, micro, checkpointed=False).total - _streamed_e2e(z, s, micro).total
    return extra > E2E_MEMORY_ALLOWANCE


def e2e_micro_batch(info_or_sizes, s: MemorySettings) -> int:
    """The windows per backward the streamed E2E-OQP runs (pipeline._train_streamed): with AdamW
    stepped from the gradient hooks, the whole step's windows in one backward when that holds less
    than the micro-batches of `s` (which accumulate a gradient for every scale and zero: a 7B
    model's 1.6 GB against 0.4 GB more logits), else `s.e2e_micro_batch` (SmolLM2: its logits
    dominate). The result is the same up to float summation order (micro_batch is memory only)."""
    z = _sizes(info_or_sizes)
    micro = s.e2e_micro_batch
    if not s.e2e_step_in_backward or micro >= s.e2e_batch:
        return micro
    whole = _streamed_e2e(z, s, s.e2e_batch).total
    return s.e2e_batch if whole < _streamed_e2e(z, s, micro).total else micro


def _streamed_then_whole(z: ModelSizes, s: MemorySettings, ckpt_bytes: int) -> list[Stage]:
    """The converter with training: the streamed passes, then the whole model for training."""
    return _streamed_oneshot(z, s) + [st for st in _whole_model(z, s, ckpt_bytes) if st.name != "one-shot"]


def estimate(info, settings: MemorySettings, pipeline: str = "whole-model", checkpoint_bytes: int | None = None
             ) -> Estimate:
    """Per-stage estimate for a ModelInfo; checkpoint_bytes: the weights' size on disk (default:
    the *.safetensors files in info.folder, or F16 when there are none)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline {pipeline!r}: choose one of {PIPELINES}")
    z = model_sizes(info)
    if checkpoint_bytes is None:
        checkpoint_bytes = _checkpoint_bytes(getattr(info, "folder", None)) or 2 * z.total
    build = {"whole-model": _whole_model, "streamed": _streamed, "streamed-oneshot": _streamed_then_whole}[pipeline]
    return Estimate(pipeline, settings, tuple(build(z, settings, checkpoint_bytes)))


def converter_pipeline(settings: MemorySettings) -> str:
    """The pipeline `pipeline.convert` runs: streamed throughout, training included (the float
    model, where it writes chat turns, is a stage of it)."""
    return "streamed"


def _checkpoint_bytes(folder) -> int:
    if folder is None or not Path(folder).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


# --- available memory ----------------------------------------------------------------------------

def available_memory() -> int:
    """Bytes a new allocation can get: MemAvailable (psutil, else /proc/meminfo), lowered to what a
    cgroup v2 limit leaves (memory.max - memory.current) when one is set."""
    avail = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
        except OSError:
            pass
    try:
        lim = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        cur = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if lim != "max":
            left = int(lim) - cur
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    if avail is None:
        raise MemoryCheckError("cannot tell the available memory (no psutil, no /proc/meminfo) — pass "
                               "--ignore-memory-check to convert without the check")
    return avail


# --- the check -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    fits: bool
    estimate: Estimate
    available: int
    message: str = ""
    alternatives: tuple = ()            # ((what to change, Estimate), ...) that fit


_FLAGS = {"nsamples": "--nsamples", "seqlen": "--seqlen", "batch_size": "--batch-size",
          "bqpo_epochs": "--bqpo-epochs", "e2e_epochs": "--e2e-epochs"}


def _describe(change: dict) -> str:
    return " ".join(f"{_FLAGS[k]} {v}" for k, v in change.items())


def _candidates(s: MemorySettings, failing: str) -> list[dict]:
    """Setting changes to try, the least intrusive first."""
    out: list[dict] = []
    if s.batch_size > 1:
        out.append({"batch_size": 1})
    n = s.nsamples // 2
    while n >= 8:
        out.append({"nsamples": n})
        n //= 2
    if s.e2e_epochs and failing != "bqpo":
        out.append({"e2e_epochs": 0})
    if s.bqpo_epochs:
        out.append({"bqpo_epochs": 0})
    if s.e2e_epochs and s.bqpo_epochs:
        out.append({"bqpo_epochs": 0, "e2e_epochs": 0})
    sl = s.seqlen // 2
    while sl >= 128:
        out.append({"seqlen": sl})
        sl //= 2
    return out


def check(info, settings: MemorySettings, available: int | None = None, pipeline: str | None = None,
          checkpoint_bytes: int | None = None) -> Verdict:
    """Whether the conversion fits in `available` bytes (default: available_memory()), with
    HEADROOM kept free; if not, a message naming the stage, its estimate and settings that fit.
    pipeline: None for the one the converter runs with each settings (converter_pipeline)."""
    avail = available_memory() if available is None else int(available)

    def est(s: MemorySettings) -> Estimate:
        return estimate(info, s, pipeline or converter_pipeline(s), checkpoint_bytes)

    e0 = est(settings)
    budget = avail * HEADROOM
    peak = e0.peak
    if peak.total <= budget:
        return Verdict(True, e0, avail)
    fits = []
    for change in _candidates(settings, peak.name):
        e = est(replace(settings, **change))
        if e.peak.total <= budget:
            fits.append((change, e))
    # the smallest change per flag: one suggestion per flag set, the first found is the mildest
    seen, picked = set(), []
    for change, e in fits:
        key = tuple(sorted(change))
        if key not in seen:
            seen.add(key)
            picked.append((change, e))
    top = sorted(peak.terms.items(), key=lambda kv: -kv[1])[:3]
    msg = (f"this conversion needs about {peak.total / GB:.1f} GB in its {peak.name} stage ("
           + ", ".join(f"{k} {v / GB:.1f} GB" for k, v in top)
           + f"), but {avail / GB:.1f} GB of memory is available ({e0.pipeline} pipeline, {settings.nsamples} x "
           f"{settings.seqlen} calibration tokens, --bqpo-epochs {settings.bqpo_epochs}, --e2e-epochs "
           f"{settings.e2e_epochs}). ")
    if peak.name == "chat":
        msg += (f"With --e2e-chat-replies {settings.chat_replies} the whole float32 model "
                f"({model_sizes(info).total * F32 / GB:.1f} GB here) is loaded to write the chat windows' turns; "
                f"--e2e-chat-replies text needs no float model. ")
    if picked:
        msg += "These would fit: " + "; ".join(
            f"{_describe(c)} (~{e.peak.total / GB:.1f} GB)" for c, e in picked[:3]) + ". "
    else:
        msg += "No smaller --nsamples/--seqlen/--batch-size or fewer training epochs fit. "
        if e0.pipeline == "whole-model":
            streamed = estimate(info, settings, converter_pipeline(settings), checkpoint_bytes)
            msg += f"The layer-streamed converter would need about {streamed.peak.total / GB:.1f} GB. "
    msg += "Free memory, or pass --ignore-memory-check to try anyway."
    return Verdict(False, e0, avail, msg, tuple(picked))


def check_convert(cfg, device: str | None = None, available: int | None = None, log=None) -> Verdict | None:
    """The check for a ConvertConfig (the pipeline the converter runs: converter_pipeline); raises
    MemoryCheckError when the conversion would not fit; None when the checkpoint itself is refused
    (the conversion then says why). Reads only config.json (and the default model's, building it
    once like the conversion would)."""
    from . import model_io

    try:
        info = model_io.inspect_checkpoint(model_io.resolve_model(cfg.model))
    except GQSAError:
        return None                   # the conversion refuses the checkpoint itself, in its own order
    v = check(info, MemorySettings.from_config(cfg, info, device=device), available=available)
    if not v.fits:
        raise MemoryCheckError(v.message)
    if log is not None:
        log(f"memory: about {v.estimate.peak.total / GB:.1f} GB at the peak ({v.estimate.peak.name}, "
            f"{v.estimate.pipeline} pipeline), {v.available / GB:.1f} GB available")
    return v


def main() -> None:
    """python -m gqsa_gguf.memory [MODEL_FOLDER|default [nsamples seqlen bqpo_epochs e2e_epochs]]"""
    import sys

    from . import model_io

    arg = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] not in ("", "default") else None
    info = model_io.inspect_checkpoint(model_io.resolve_model(arg))
    vals = [int(x) for x in sys.argv[2:6]]
    s = MemorySettings(**dict(zip(("nsamples", "seqlen", "bqpo_epochs", "e2e_epochs"), vals)))
    for p in PIPELINES:
        print(estimate(info, s, p).format())


if __name__ == "__main__":
    main()
