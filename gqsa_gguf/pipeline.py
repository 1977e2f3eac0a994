"""`gqsa-gguf convert` end to end: checkpoint -> calibration -> one-shot GQSA -> training -> GGUF.

In:  a `ConvertConfig`.
Out: the GGUF at config.output (written atomically: on any error no file appears) and a
     `ConvertReport` (timings, the export summary, notes).

The one-shot is streamed (issue 16): the model is never loaded whole. The checkpoint is read a
decoder block at a time (`streamed.StreamedModel`) by the allocation's sensitivity pass and then
by the one-shot pass (`oneshot.sensitivity_blocks`, `oneshot.compress_blocks`: the same per-block
code as for a model in memory); each finished block goes to disk as gqsa4 rows
(`streamed.BlockStore`: --checkpoint-dir/oneshot, or a temporary folder), and the export reads
the dense tensors and the blocks back one at a time. With --checkpoint-dir each pass saves its
state (the next block's inputs) at most every CHAIN_SAVE_SECONDS, and --resume continues it.

Training is streamed too (streamed_train.py): BQPO reads each float block again for its targets
and writes the trained blocks to --checkpoint-dir/bqpo (or a temporary folder); E2E-OQP keeps the
float model's final hidden states from one more streamed pass (its teacher) and trains a student
whose linears are the compressed rows expanded per call (fakequant.PackedGQSLinear), its layers
under activation checkpointing, and writes its blocks to --checkpoint-dir/e2e/blocks. The whole
float model is loaded only to write turns of E2E-OQP's chat windows (--e2e-chat-replies model or
self, `_with_chat_windows`), and freed before the training. `train` is the whole-model training
(BQPO, bqpo.run_bqpo, and E2E-OQP, e2e.run_e2e, on a float model in memory) that
benchmarks/quality.py uses. The GGUF's `gqsa.config` records the configs used, learning rates
included.

Everything that can be refused cheaply is refused before any heavy work, in this order: the
output path, the checkpoint (folder, architecture,
widths), the calibration text (empty / too short), and only then are weights read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import format as fmt
from .config import BQPOConfig, ConfigError, ConvertConfig, E2EConfig

__all__ = ["ConvertReport", "TrainResult", "convert", "train", "check_output_path"]


@dataclass
class ConvertReport:
    output: Path
    seconds: dict[str, float]
    summary: object            # export.ExportSummary
    notes: list[str] = field(default_factory=list)
    # stage -> the process's peak RSS in bytes when the stage ended (a running maximum: the stage
    # whose value rises set a new peak); BQPO and E2E-OQP both get the value at the end of training
    peak_rss: dict[str, int] = field(default_factory=dict)


def max_rss_bytes() -> int:
    """The peak resident set size of this process so far (getrusage; Linux counts kB)."""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


class _StageTimes(dict):
    """{stage: seconds}; setting a stage's seconds also records the peak RSS so far (peak_rss)."""

    def __init__(self):
        super().__init__()
        self.peak_rss: dict[str, int] = {}

    def __setitem__(self, stage: str, seconds: float) -> None:
        super().__setitem__(stage, seconds)
        self.peak_rss[stage] = max_rss_bytes()


def check_output_path(output: str) -> Path:
    p = Path(output).expanduser()
    if p.is_dir():
        raise ConfigError(f"-o {output}: is a folder; give the path of the .gguf file to write")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"-o {output}: the folder '{parent}' does not exist — create it first")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"-o {output}: the folder '{parent}' is not writable")
    return p


def convert(cfg: ConvertConfig, progress: bool = True, log=print, checkpoint_dir: str | None = None,
            resume: bool = False) -> ConvertReport:
    """checkpoint_dir / resume: where the one-shot result and the BQPO / E2E-OQP progress are
    checkpointed, and whether to continue an interrupted run from them (the training configs'
    run-only fields, config.RUN_ONLY)."""
    from . import calib, export, model_io, streamed

    cfg = resolve_training_precision(cfg, log)
    c = cfg.compression
    if resume and not checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint-dir (the folder the interrupted run wrote its checkpoints to)")
    out = check_output_path(cfg.output)
    times = _StageTimes()
    notes: list[str] = []

    t = time.time()
    folder = model_io.resolve_model(cfg.model)
    info = model_io.inspect_checkpoint(folder)
    log(f"model: {folder}\n  {model_io.describe(info)}")
    cfg = resolve_memory_choices(cfg, info, log)
    tokenizer = model_io.load_tokenizer(info)
    text, desc = calib.load_text(cfg.calib.source)
    seqlen = _clipped_to_context("--seqlen", cfg.calib.seqlen, info, notes)
    ids = calib.tokenize(tokenizer, text)
    windows = _windows(ids, cfg.calib.nsamples, seqlen, cfg.calib.seed, notes, "nsamples", "windows")
    log(f"calibration: {desc}, {ids.size} tokens -> {cfg.calib.nsamples} windows x {seqlen} tokens "
        f"(seed {cfg.calib.seed})")
    e2e_windows = windows
    e2e_seqlen = (_clipped_to_context("--e2e-seqlen", cfg.e2e.seqlen, info, notes if cfg.e2e.epochs else [])
                  if cfg.e2e.seqlen else seqlen)
    cfg = dataclasses.replace(cfg, e2e=dataclasses.replace(cfg.e2e, seqlen=e2e_seqlen))   # what runs is recorded
    n_e2e = cfg.e2e.windows or cfg.calib.nsamples
    if cfg.e2e.epochs and (n_e2e != cfg.calib.nsamples or e2e_seqlen != seqlen):
        e2e_windows = _windows(ids, n_e2e, e2e_seqlen, cfg.calib.seed, notes, "e2e windows", "E2E-OQP windows")
        log(f"E2E-OQP windows: {n_e2e} x {e2e_seqlen} tokens from the same text")
    times["prepare"] = time.time() - t

    log(f"compressing: GQSA {c.spec} ({c.bits}-bit codes, {fmt.gqsa_type(c.bits).name}; {c.sparsity:.0%} of 16-weight "
        f"groups pruned per row on average), "
        f"{'error-compensated (OBS)' if c.method == 'obs' else 'round-to-nearest'} one-shot, "
        f"{c.allocation} allocation, {'sequential' if c.sequential else 'parallel'} block-wise calibration, "
        f"damp {c.damp}; the checkpoint is read one decoder block at a time")
    # the config recorded in the file says what was really used (e.g. the clipped seqlen)
    used = dataclasses.replace(cfg, calib=dataclasses.replace(cfg.calib, seqlen=seqlen))
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(_oneshot_folder(checkpoint_dir))
        source = streamed.StreamedModel(info)
        store, rel_errors = _oneshot_streamed(source, info, windows, cfg, work, checkpoint_dir is not None,
                                              resume, progress, log, times)
        worst = sorted(rel_errors.items(), key=lambda kv: -kv[1])[:3]
        notes.append("largest relative output errors tr(DHD^T)/tr(WHW^T): "
                     + ", ".join(f"{n.replace('model.layers.', 'L')} {e:.3f}" for n, e in worst))

        if cfg.bqpo.epochs or cfg.e2e.epochs:
            rope = model_io.rope_freq_factors(source.model, info)
            e2e_windows = _with_chat_windows(info, tokenizer, ids, e2e_windows, e2e_seqlen, cfg, checkpoint_dir,
                                             resume, progress, log, notes, times)
            linears, norms = stack.enter_context(_train_streamed(source, store, windows, e2e_windows, cfg, checkpoint_dir,
                                                                 resume, progress, log, times))
            dense = _Overlay(source.state_dict(), norms)
        else:
            dense, linears = source.state_dict(), store
            rope = model_io.rope_freq_factors(source.model, info)
        t = time.time()
        summary = export.export_gguf(out, info, dense, linears, used, progress=False, rope_factors=rope)
        times["export"] = time.time() - t
    return ConvertReport(output=out, seconds=dict(times), summary=summary, notes=notes, peak_rss=times.peak_rss)


ONESHOT_DIR = "oneshot"             # under --checkpoint-dir: the per-block files and pass states
CHAIN_SAVE_SECONDS = 60.0           # a pass's chain state is saved at most this often (and at its end)


def resolve_training_precision(cfg: ConvertConfig, log=print) -> ConvertConfig:
    """cfg with BQPO's and E2E-OQP's amp "auto" replaced by what this machine will use (so the
    file's gqsa.config records the precision the training really had)."""
    from .training import resolve_amp

    bqpo = dataclasses.replace(cfg.bqpo, amp=resolve_amp(cfg.bqpo.amp, cfg.bqpo.device))
    e2e = dataclasses.replace(cfg.e2e, amp=resolve_amp(cfg.e2e.amp, cfg.e2e.device))
    if (bqpo.epochs and cfg.bqpo.amp == "auto") or (e2e.epochs and cfg.e2e.amp == "auto"):
        used = e2e.amp if e2e.epochs else bqpo.amp
        log(f"training precision: {'bf16 autocast (the device multiplies bf16 in hardware)' if used == 'bf16' else 'fp32'}"
            f" (--amp auto)")
    return dataclasses.replace(cfg, bqpo=bqpo, e2e=e2e)


def _clipped_to_context(flag: str, length: int, info, notes: list) -> int:
    """A window length (--seqlen, --e2e-seqlen) no longer than the model's context, with a note
    where it was cut."""
    if length > info.context_length:
        notes.append(f"{flag} {length} clipped to the model's context length {info.context_length}")
        return info.context_length
    return length


def _windows(ids, n: int, length: int, seed: int, notes: list, count: str, what: str):
    """calib.calibration_windows, with a note where the text is too short for them not to overlap."""
    from . import calib

    if ids.size < n * length:
        notes.append(f"calibration text has {ids.size} tokens < {count} x seqlen = {n * length}: {what} overlap")
    return calib.calibration_windows(ids, n, length, seed)


# what E2E-OQP's chat windows are made of, per --e2e-chat-replies (for the log)
_CHAT_MADE_OF = {"text": "made of the calibration text",
                 "model": "of user turns from the calibration text and the float model's own answers",
                 "self": "of the float model's own questions and answers"}


def resolve_memory_choices(cfg: ConvertConfig, info, log=print) -> ConvertConfig:
    """cfg with E2E-OQP's "auto" memory-for-time and memory-for-quality choices replaced by what this
    model gets (memory.e2e_moments, memory.e2e_checkpointing, memory.chat_replies), so the file's
    gqsa.config records what ran."""
    from . import memory

    if not cfg.e2e.epochs or "auto" not in (cfg.e2e.moments, cfg.e2e.checkpointing, cfg.e2e.chat_replies):
        return cfg
    settings = memory.MemorySettings.from_config(cfg, info)
    moments = memory.e2e_moments(info, settings)
    checkpointing = "on" if memory.e2e_checkpointing(info, settings) else "off"
    replies = memory.chat_replies(info, settings)
    log(f"E2E-OQP: AdamW moments {moments}" + (" (--e2e-moments auto)" if cfg.e2e.moments == "auto" else "")
        + "; " + ("each decoder layer under activation checkpointing" if checkpointing == "on" else
                  "every decoder layer's activations kept for the backward")
        + (" (--e2e-checkpointing auto)" if cfg.e2e.checkpointing == "auto" else "")
        + ("" if not cfg.e2e.chat_share else
           f"; chat windows {_CHAT_MADE_OF[replies]}" + (" (--e2e-chat-replies auto)" if cfg.e2e.chat_replies == "auto" else "")))
    return dataclasses.replace(cfg, e2e=dataclasses.replace(cfg.e2e, moments=moments, checkpointing=checkpointing,
                                                            chat_replies=replies))


@contextlib.contextmanager
def _oneshot_folder(checkpoint_dir, sub: str = "oneshot"):
    """Where a stage's finished blocks go: --checkpoint-dir/<sub>, or a temporary folder (removed at
    the end) — the blocks are kept on disk, not in memory, whatever the model's depth."""
    if checkpoint_dir:
        folder = Path(checkpoint_dir) / sub
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
    else:
        with tempfile.TemporaryDirectory(prefix=f"gqsa-{sub}-") as tmp:
            yield Path(tmp)


class _PassState:
    """The chain state of a block-wise pass (oneshot.ChainState) and what it has gathered so far,
    saved atomically in one checkpoint file: after a block when CHAIN_SAVE_SECONDS have passed
    since the last save, and after the last block. Without a file (no --checkpoint-dir) nothing
    is saved."""

    def __init__(self, path: Path | None, stage: str, fingerprint: str, n_layers: int):
        self.path, self.stage, self.fingerprint, self.n_layers = path, stage, fingerprint, n_layers
        self.last = time.time()

    def load(self):
        """(ChainState, gathered, seconds) of the saved state, or None."""
        from . import checkpoint as ckpt
        from .oneshot import ChainState

        if self.path is None or not self.path.exists():
            return None
        meta, payload = ckpt.load(self.path, expect={"stage": self.stage, "fingerprint": self.fingerprint})
        state = ChainState(int(meta["next_block"]), payload["hidden"], payload["fhidden"])
        return state, payload["gathered"], float(meta["seconds"])

    def save(self, state, gathered, seconds: float) -> None:
        from . import checkpoint as ckpt

        done = state.block >= self.n_layers
        if self.path is None or not (done or time.time() - self.last >= CHAIN_SAVE_SECONDS):
            return
        ckpt.save(self.path, {"stage": self.stage, "fingerprint": self.fingerprint, "next_block": state.block,
                              "seconds": seconds},
                  {"hidden": [] if done else state.hidden, "fhidden": None if done else state.fhidden,
                   "gathered": gathered})
        self.last = time.time()


def _oneshot_streamed(source, info, windows, cfg, folder: Path, checkpointing: bool, resume: bool, progress,
                      log, times):
    """The allocation's sensitivity pass and the one-shot pass over `source` (a block source:
    streamed.StreamedModel), each block's result written to a streamed.BlockStore in `folder` as
    it is finished. With `checkpointing` each pass's state is saved there too (_PassState), and
    `resume` continues each pass from it. Returns (the store, {linear name: relative error})."""
    from . import checkpoint as ckpt
    from . import oneshot, streamed

    c = cfg.compression
    fp = ckpt.run_fingerprint(dataclasses.asdict(c), info.hf_config, windows, cfg.calib.batch_size)
    store = streamed.BlockStore(folder, fp, info.n_layers, info.layout.linears)
    state = _PassState(folder / "oneshot.ckpt" if checkpointing else None, "oneshot", fp, info.n_layers)
    saved = state.load() if resume else None
    if saved is not None and not store.complete(saved[0].block):
        raise ckpt.CheckpointError(f"{folder}: the one-shot state says blocks 0..{saved[0].block - 1} are done, but "
                                   f"their files are not all there — delete {folder} to start the one-shot over")
    if saved is not None and saved[0].block >= info.n_layers:
        log(f"one-shot: resumed from {folder} (all {info.n_layers} blocks done)")
        times["compress"] = saved[2]
        return store, saved[1]
    keep = None
    if c.allocation == "sensitivity":
        t = time.time()
        probe = _PassState(folder / "sensitivity.ckpt" if checkpointing else None, "sensitivity", fp, info.n_layers)
        keep = choose_allocation(source, info, windows, c, progress=progress, log=log, state=probe, resume=resume)
        times["allocate"] = time.time() - t
    t0 = time.time()
    resume_from, rel_errors, before = saved if saved is not None else (None, {}, 0.0)
    if saved is not None:
        log(f"one-shot: resumed from {folder} at block {resume_from.block}")
    for res, chain in oneshot.compress_blocks(source, info, windows, c, batch_size=cfg.calib.batch_size,
                                              progress=progress, keep=keep, resume=resume_from):
        store.put(res)
        rel_errors.update(res.rel_errors)
        state.save(chain, rel_errors, before + time.time() - t0)
    times["compress"] = before + time.time() - t0
    return store, rel_errors


class _Overlay(Mapping):
    """A state-dict mapping with some of its tensors replaced (the trained norm gains)."""

    def __init__(self, base: Mapping, over: dict):
        self._base, self._over = base, over

    def __getitem__(self, name):
        return self._over[name] if name in self._over else self._base[name]

    def __iter__(self):
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


@contextlib.contextmanager
def _train_streamed(source, store, windows, e2e_windows, cfg, checkpoint_dir, resume: bool, progress: bool, log,
                    times):
    """BQPO then E2E-OQP streamed (streamed_train.py) on the one-shot `store`; yields ({HF linear
    name: PackedLinear}, the trained norm gains {HF name: tensor}) — a BlockStore of the last stage
    that ran, in --checkpoint-dir/bqpo and /e2e (or temporary folders, removed when the with-block
    ends). With --checkpoint-dir, BQPO saves its chains after every block and E2E-OQP its state
    after every epoch; --resume continues them."""
    from . import checkpoint as ckpt
    from . import memory, streamed, streamed_train
    from .e2e import norm_parameters

    ck = (lambda sub: str(Path(checkpoint_dir) / sub)) if checkpoint_dir else (lambda sub: None)
    with contextlib.ExitStack() as stack:
        linears, norms = store, {}
        if cfg.bqpo.epochs:
            t = time.time()
            folder = stack.enter_context(_oneshot_folder(checkpoint_dir, "bqpo"))
            bq = dataclasses.replace(cfg.bqpo, checkpoint_dir=ck("bqpo"), resume=resume, progress=progress)
            linears, _ = streamed_train.run_bqpo_streamed(source, linears, windows, bq, folder, store.fingerprint,
                                                          checkpointing=checkpoint_dir is not None, log=log)
            times["bqpo"] = time.time() - t
        if cfg.e2e.epochs:
            t = time.time()
            folder = stack.enter_context(_oneshot_folder(checkpoint_dir, "e2e"))
            # AdamW stepped from the gradient hooks holds no gradient only when a step is one
            # backward: the whole step's windows in one micro-batch where that holds less (memory.py)
            settings = memory.MemorySettings.from_config(cfg, source.info)
            micro = memory.e2e_micro_batch(source.info, settings)
            if micro != cfg.e2e.micro_batch:
                log(f"E2E-OQP: {micro} windows per backward (AdamW stepped in the backward, no gradient kept)")
            checkpointed = memory.e2e_checkpointing(source.info, settings)
            e2 = dataclasses.replace(cfg.e2e, checkpoint_dir=ck("e2e"), resume=resume, progress=progress,
                                     micro_batch=micro)
            student, _ = streamed_train.run_e2e_streamed(source, linears, e2e_windows, e2, batch_size=cfg.calib.batch_size,
                                                         log=log, checkpointed=checkpointed)
            out = streamed.BlockStore(Path(folder) / "blocks", ckpt.run_fingerprint("e2e-blocks", linears.fingerprint),
                                      source.n_layers, source.info.layout.linears)
            out.folder.mkdir(parents=True, exist_ok=True)
            streamed_train.put_blocks(student, out)
            norms = {n: p.detach().clone() for n, p in norm_parameters(student)}
            student.to("meta")                     # frees the student: the export reads the checkpoint again
            del student
            linears = out
            times["e2e"] = time.time() - t
        yield linears, norms


def choose_allocation(model, info, windows, c, progress: bool = True, log=print, state: _PassState | None = None,
                      resume: bool = False) -> dict[str, int]:
    """{linear name: kept groups per row} from the measured sensitivity (allocation.py). model: an
    HF model or a block source (oneshot.as_blocks); state / resume: the probe's saved progress."""
    from . import allocation, oneshot

    if windows.numel() < 16384:
        log(f"note: the sensitivity allocation is measured on only {windows.numel()} calibration tokens; with "
            f"so few it can spread the budget badly — use more (--nsamples/--seqlen) or --allocation uniform")
    saved = state.load() if state is not None and resume else None
    chain, gathered, before = saved if saved is not None else (None, [], 0.0)
    t0 = time.time()
    if chain is None or chain.block < info.n_layers:
        for block_curves, chain in oneshot.sensitivity_blocks(model, info, windows, c, progress=progress,
                                                              resume=chain):
            gathered += [dataclasses.asdict(cv) for cv in block_curves]
            if state is not None:
                state.save(chain, gathered, before + time.time() - t0)
    curves = [allocation.TensorCurve(**{k: tuple(v) if isinstance(v, list) else v for k, v in cv.items()})
              for cv in gathered]
    keep = allocation.allocate(curves, c.sparsity)
    shapes = {cv.name: (cv.rows, cv.width) for cv in curves}
    uniform = allocation.uniform_bits(shapes, c.sparsity, c.bits) / sum(r * w for r, w in shapes.values())
    share = [keep[cv.name] / cv.groups for cv in curves]
    log(f"allocation: {allocation.mean_bits(shapes, keep, c.bits):.4f} bits/weight on average over the decoder linears "
        f"(uniform {uniform:.4f}); kept share per tensor {min(share):.0%}..{max(share):.0%}")
    return keep


@dataclass
class TrainResult:
    """What `train` returns: the trained linears (export's input), the RMSNorm gains after
    training, each stage's own seconds and report."""

    linears: dict                   # {HF linear name: oneshot.CompressedLinear}
    norms: dict                     # {HF parameter name: float32 CPU tensor}, every *norm.weight
    seconds: dict[str, float]       # "bqpo", "e2e": the stages that ran
    bqpo: object = None             # bqpo.BQPOReport, or None when BQPO did not run
    e2e: object = None              # e2e.E2EReport, or None when E2E-OQP did not run

    def load_norms(self, model) -> None:
        """Copies the trained RMSNorm gains into `model` (an HF model of the same architecture)."""
        import torch

        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.norms:
                    p.copy_(self.norms[name].to(p.device))

    def load_into(self, model) -> None:
        """Makes a float HF model compute what the trained file holds: the trained linears'
        dequantized weights and the trained RMSNorm gains (for PyTorch evaluation)."""
        from .oneshot import apply_compressed

        apply_compressed(model, self.linears)
        self.load_norms(model)


def _with_chat_windows(info, tokenizer, ids, e2e_windows, seqlen: int, cfg, checkpoint_dir, resume: bool,
                       progress: bool, log, notes: list, times: dict):
    """E2E-OQP's windows with their last `chat_share` replaced by conversations in the model's chat
    template (calib.chat_windows): turns of the calibration text ("text"), or with the float model
    writing the assistant turns ("model") or the user and assistant turns ("self"). For those the
    float model is loaded whole, on the training device, and freed before the training; the windows
    are saved to CHECKPOINT_DIR/chat.ckpt so that --resume reuses them without loading it."""
    import gc

    import torch

    from . import calib, model_io
    from . import checkpoint as ckpt

    n_chat = round(cfg.e2e.chat_share * e2e_windows.shape[0]) if cfg.e2e.epochs else 0
    if not n_chat:
        return e2e_windows
    if not calib.has_chat_template(tokenizer):
        notes.append("the tokenizer has no chat template: E2E-OQP trains on plain text only")
        return e2e_windows
    t = time.time()
    mode = cfg.e2e.chat_replies
    if mode not in _CHAT_MADE_OF:
        raise ConfigError(f"--e2e-chat-replies {mode!r} is not resolved (resolve_memory_choices)")
    if mode == "text":
        chats = calib.chat_windows(tokenizer, ids, n_chat, seqlen, cfg.calib.seed)
    else:
        path = Path(checkpoint_dir) / "chat.ckpt" if checkpoint_dir else None
        fp = ckpt.run_fingerprint(info.hf_config, ids, n_chat, seqlen, cfg.calib.seed, mode)
        chats = None
        if resume and path is not None and path.exists():
            _meta, payload = ckpt.load(path, expect={"stage": "chat", "fingerprint": fp})
            chats = payload["windows"]
            log(f"E2E-OQP: chat windows read from {path}")
        if chats is None:
            model = model_io.load_model(info).to(cfg.e2e.device)
            try:
                reply = calib.model_replies(model, tokenizer, cfg.calib.seed, amp=cfg.e2e.amp, progress=progress)
                ask = (calib.model_questions(model, tokenizer, cfg.calib.seed, amp=cfg.e2e.amp, progress=progress)
                       if mode == "self" else None)
                chats = calib.chat_windows(tokenizer, ids, n_chat, seqlen, cfg.calib.seed, reply=reply, ask=ask)
            finally:
                del model
                gc.collect()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                ckpt.save(path, {"stage": "chat", "fingerprint": fp}, {"windows": chats})
    times["chat"] = time.time() - t
    log(f"E2E-OQP: {n_chat} of its {e2e_windows.shape[0]} windows are conversations in the model's chat "
        f"template, {_CHAT_MADE_OF[mode]}")
    return torch.cat([e2e_windows[:e2e_windows.shape[0] - n_chat], chats])


def train(float_model, linears: dict, windows, bqpo: BQPOConfig, e2e: E2EConfig, log=print,
          e2e_windows=None) -> TrainResult:
    """BQPO (paper §3.3) then E2E-OQP (§3.4) on the one-shot result `linears`; a stage with
    epochs 0 is skipped (both 0: the one-shot result comes back). `float_model` keeps its weights:
    BQPO's targets and, with e2e.loss "kd", E2E-OQP's teacher (both move it to their device).
    `e2e_windows`: E2E-OQP's training windows when they differ from `windows` (e2e.windows)."""
    import copy

    from .bqpo import compressed_from_model, run_bqpo
    from .e2e import frozen_from_oneshot, norm_parameters, run_e2e

    seconds: dict[str, float] = {}
    if not bqpo.epochs and not e2e.epochs:
        return TrainResult(linears=linears, norms={}, seconds=seconds)
    rep_b = rep_e = None
    if bqpo.epochs:
        t = time.time()
        qm, rep_b = run_bqpo(float_model, linears, windows, bqpo, log=log)
        seconds["bqpo"] = time.time() - t
    else:
        qm = copy.deepcopy(float_model)        # float_model stays the E2E teacher
        frozen_from_oneshot(qm, linears)
    if e2e.epochs:
        t = time.time()
        rep_e = run_e2e(qm, windows if e2e_windows is None else e2e_windows, e2e, log=log,
                        teacher=float_model if e2e.loss == "kd" else None)
        seconds["e2e"] = time.time() - t
    qm = qm.cpu()
    return TrainResult(linears=compressed_from_model(qm), seconds=seconds, bqpo=rep_b, e2e=rep_e,
                       norms={n: p.detach().clone() for n, p in norm_parameters(qm)})
