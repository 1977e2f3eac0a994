"""E2E-OQP — End-to-End Optimized Quantization-Pruning (paper §3.4): train only scales and zeros.

In:  a model whose decoder linears are `fakequant.FrozenGQSLinear` (from `bqpo.run_bqpo`, or
     `frozen_from_oneshot` for E2E-OQP straight after one-shot) or `fakequant.PackedGQSLinear` (the
     streamed E2E-OQP, streamed_train.py), training windows LongTensor
     [nsamples, seqlen], an `E2EConfig` (config.py; re-exported here).
Out: `run_e2e(model, windows, cfg)` -> `E2EReport` (per-step loss, per-epoch mean, seconds); the
     model's scales and zero points are trained in place, and with lr_norm > 0 its RMSNorm gains
     (`norm_parameters`: F32 in the file, no bits); integer codes q, group indices, and every
     other weight stay bit-identical (only those have requires_grad, tested).

Objective: the causal LM loss (next-token cross entropy) of the whole model, or with loss="kd"
the KL divergence to the float model's next-token distributions (distillation; what the converter
uses), mean over the windows of a global batch; AdamW with lr_scale / lr_zero / lr_norm, constant or
(lr_decay > 0) falling linearly over that last share of the steps (`lr_factor`), each scale's step
in its own units or (scale_step "relative") as a share of its magnitude; fp32, or bf16 autocast
(CPU or CUDA; `--amp auto` picks it where the device multiplies bf16 in hardware), or fp16
autocast with a GradScaler on CUDA.

Data parallel: under `torchrun` (WORLD_SIZE > 1) call `init_distributed(device)` first (gloo on the
CPU, NCCL on CUDA), and `close_distributed()` at the end (a barrier, then the group torn down, so no
rank closes its connections while another still uses them). Every rank builds the same windows and
the same shuffled order (seeded from (seed, epoch)); rank r takes its equal slice of each global
batch, each micro-batch contributes loss * micro / global_batch, and gradients are summed with
all_reduce — so a step is the same update as one process on the whole global batch (up to float
summation order; tested with 2 gloo processes). The optimizer step then follows the all_reduce. Rank
0 writes the checkpoints; all ranks read them on resume.

Optimizer step (`ParamStepper`): in one process AdamW steps each parameter from its
post-accumulate-grad hook as soon as its gradient is complete (cfg.step_in_backward, the default)
and frees the gradient, so no gradient for the whole model is held; with several micro-batches a
step the hooks step only on the last one (the earlier ones accumulate as before, so the gradients
are held until then: memory.py has the converter's streamed E2E-OQP take the step's windows in one
backward where that holds less). Each step is torch's AdamW on that one parameter with the shared
state: bit-identical on the CPU to one step after the backward (tested). Off, under torchrun and
with fp16's GradScaler: one step after the backward. cfg.moments="bf16" keeps the two moments in
bf16 between steps (computed in fp32).

Checkpoints (`checkpoint_dir`): after every epoch, atomically, `e2e.ckpt` with all scales/zeros (and norm gains),
the optimizer state and the loss log; `resume=True` continues with the next epoch and gives the
same result as an uninterrupted run (tested). A NaN/Inf loss or scale raises TrainingError naming
the epoch and step.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import E2EConfig
from .fakequant import FrozenGQSLinear, PackedGQSLinear, gqs_modules, swap_linear
from .training import TrainingError, autocast, check_amp, check_finite, resolve_amp, resolve_device, seeded

__all__ = ["E2EConfig", "E2EReport", "run_e2e", "init_distributed", "close_distributed", "frozen_from_oneshot",
           "trainable_parameters", "distillation_loss", "HiddenStateTeacher"]

CKPT_NAME = "e2e.ckpt"


@dataclass
class E2EReport:
    step_loss: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    resumed_from: int = 0
    stepped_in_backward: bool = False                  # AdamW stepped from the gradient hooks


class ParamStepper:
    """AdamW one parameter at a time: for each parameter of `opt` (a torch AdamW), a one-parameter
    AdamW with its group's hyperparameters that shares `opt.state` — so each step is torch's own
    update of that parameter, and `opt.state_dict()` / `load_state_dict` (the checkpoints) see
    every moment. `moments="bf16"` keeps the two moments in bf16 between steps (upcast for the step,
    rounded when stored). `hook()` steps each parameter from its post-accumulate-grad hook while
    `armed` and frees its gradient at once: no gradient for the whole model is ever held. Create it
    after `opt.load_state_dict` (which replaces opt.state)."""

    MOMENT_KEYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, opt: torch.optim.Optimizer, moments: str = "fp32", relative=()):
        self.opt = opt
        self.dtype = {"fp32": None, "bf16": torch.bfloat16}[moments]
        self.relative = set(relative)                 # stepped relative to their magnitude (E2EConfig.scale_step)
        self.subs: dict = {}
        self.group: dict = {}
        for g in opt.param_groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            for p in g["params"]:
                sub = torch.optim.AdamW([{**hyper, "params": [p]}])
                sub.state = opt.state
                self.subs[p] = sub
                self.group[p] = g
                self._store(p)                         # moments loaded from a checkpoint: back to bf16
        self.armed = False
        self._handles: list = []

    def _store(self, p) -> None:
        st = self.opt.state.get(p)
        if self.dtype is not None and st:
            for k in self.MOMENT_KEYS:
                st[k] = st[k].to(self.dtype)

    def step(self, p) -> None:
        """One AdamW step of parameter p with its current .grad (then freed)."""
        st = self.opt.state.get(p)
        if self.dtype is not None and st:
            for k in self.MOMENT_KEYS:
                st[k] = st[k].float()
        self.subs[p].param_groups[0]["lr"] = self.group[p]["lr"]   # the schedule sets opt's groups
        if p in self.relative:
            # AdamW's update scaled by each value's magnitude before the step: AdamW on log|p| to
            # first order, so lr is a share of the value (one parameter's copy at a time)
            with torch.no_grad():
                old = p.detach().clone()
                self.subs[p].step()
                p.sub_(old).mul_(old.abs()).add_(old)
        else:
            self.subs[p].step()
        self._store(p)
        p.grad = None

    def step_all(self) -> None:
        """Steps every parameter that has a gradient (after a backward without the hooks)."""
        for p in self.subs:
            if p.grad is not None:
                self.step(p)

    def hook(self) -> None:
        def fn(p):
            if self.armed:
                self.step(p)

        self._handles = [p.register_post_accumulate_grad_hook(fn) for p in self.subs]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Joins the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA);
    returns (rank, world size). A single process returns (0, 1) and starts nothing."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def close_distributed() -> None:
    """Leaves the process group init_distributed joined (nothing when none is): every rank waits
    at a barrier first, so no rank tears its connections down while another is still sending; gloo
    aborts a process (SIGABRT from its I/O thread) whose peer vanished mid-operation."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def frozen_from_oneshot(model, compressed: dict) -> None:
    """Replaces the model's decoder linears named in `compressed` by FrozenGQSLinear (in place)."""
    for name, cl in compressed.items():
        old = model.get_submodule(name)
        swap_linear(model, name, FrozenGQSLinear.from_compressed(cl, getattr(old, "bias", None))
                    .to(old.weight.device))


def trainable_parameters(model) -> tuple[list, list, list]:
    """Freezes everything, then enables the scales and zeros of every FrozenGQSLinear.
    Returns (scales, zeros, named list for NaN checks)."""
    mods = gqs_modules(model)
    if not mods:
        raise TrainingError("E2E-OQP: the model has no FrozenGQSLinear layers — run BQPO first or "
                            "frozen_from_oneshot")
    for p in model.parameters():
        p.requires_grad_(False)
    scales, zeros, named = [], [], []
    for name, m in mods.items():
        if not isinstance(m, (FrozenGQSLinear, PackedGQSLinear)):
            raise TrainingError(f"E2E-OQP: {name} is a {type(m).__name__}; freeze it first (bqpo.freeze_model)")
        m.scale.requires_grad_(True)
        m.zero.requires_grad_(True)
        scales.append(m.scale)
        zeros.append(m.zero)
        named += [(name + ".scale", m.scale), (name + ".zero", m.zero)]
    return scales, zeros, named


def norm_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The RMSNorm gains of the model (every parameter named *norm.weight), in model order."""
    return [(n, p) for n, p in model.named_parameters() if n.endswith("norm.weight")]


def _qparam_state(model, copy: bool = True) -> dict:
    """{name: tensor} of every scale, zero and norm gain, on the CPU; copy=False: the parameters
    themselves where they are on the CPU (for a checkpoint written at once: no second copy)."""
    def cpu(t):
        t = t.detach().cpu()
        return t.clone() if copy else t

    state = {f"{n}.{k}": cpu(getattr(m, k)) for n, m in gqs_modules(model).items() for k in ("scale", "zero")}
    state.update({n: cpu(p) for n, p in norm_parameters(model)})
    return state


def _fingerprint(cfg, model, windows, world) -> str:
    mods = gqs_modules(model)
    parts = [cfg.fingerprint_dict(), model.config.to_dict(), windows, world]
    for n in sorted(mods):
        parts += [n, *mods[n].frozen_tensors()]
    return ckpt.run_fingerprint(*parts)


class HiddenStateTeacher(torch.nn.Module):
    """The teacher of the streamed E2E-OQP: the float model's final hidden states on every training
    window (kept, [windows, seqlen, hidden], fp16 or float32, on the CPU), turned into logits when
    asked through the float final norm and the head — the last two steps of the float model's
    forward, so no float model is held (streamed_train.py)."""

    def __init__(self, norm: torch.nn.Module, head: torch.nn.Module, hidden: torch.Tensor):
        super().__init__()
        self.norm, self.head = norm, head
        self.hidden = hidden                              # not a buffer: stays where it is

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits [len(rows), seqlen, vocab] of the windows numbered `rows`."""
        h = self.hidden[rows].to(self.norm.weight.device, torch.float32)
        return self.head(self.norm(h))


def distillation_loss(logits: torch.Tensor, teacher, ids: torch.Tensor, device, amp: str,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions. teacher: the
    float model, or a HiddenStateTeacher (then `rows`: the windows' numbers among its hidden states)."""
    with torch.no_grad(), autocast(device, amp):
        if isinstance(teacher, HiddenStateTeacher):
            if rows is None:
                raise TrainingError("E2E-OQP: a HiddenStateTeacher needs the windows' numbers (rows)")
            t = teacher(rows)
        else:
            t = teacher(input_ids=ids, use_cache=False).logits
    v = logits.shape[-1]
    log_p_s = F.log_softmax(logits.float().reshape(-1, v), dim=-1)
    log_p_t = F.log_softmax(t.float().reshape(-1, v), dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def run_e2e(model, windows: torch.Tensor, cfg: E2EConfig,
            on_epoch_end: Callable[[int], None] | None = None, log: Callable[[str], None] = print,
            max_steps: int | None = None, teacher=None) -> E2EReport:
    """Trains scales and zero points end to end (see module docstring). `max_steps` (tests,
    smoke runs) stops each epoch after that many optimizer steps. `teacher`: the float model, or a
    HiddenStateTeacher of its final hidden states on `windows` (the streamed E2E-OQP), needed by
    cfg.loss == "kd" (run without gradients, on the same device)."""
    if cfg.moments not in ("fp32", "bf16"):
        raise TrainingError(f"E2E-OQP: moments {cfg.moments!r} must be resolved to fp32 or bf16 before training "
                            f"(the converter does: pipeline.resolve_memory_choices)")
    if cfg.loss == "kd" and teacher is None:
        raise TrainingError("E2E-OQP: loss 'kd' needs the float model as teacher")
    device = resolve_device(cfg.device)
    if teacher is not None:
        teacher.to(device)
        teacher.train(False)
    cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, device))
    check_amp(cfg.amp, device)
    dist, rank, world = _dist()
    if cfg.batch_size % (world * cfg.micro_batch):
        raise TrainingError(f"e2e.batch_size {cfg.batch_size} must be a multiple of world size {world} x "
                            f"micro_batch {cfg.micro_batch}, so every rank gets equal micro-batches")
    windows = torch.as_tensor(windows, dtype=torch.long)
    n = windows.shape[0]
    if n < cfg.batch_size:
        raise TrainingError(f"E2E-OQP: {n} windows are fewer than one global batch of {cfg.batch_size}")
    model.to(device)
    model.train(False)                                 # no dropout; training mode is not needed
    scales, zeros, named = trainable_parameters(model)
    norms = []
    if cfg.lr_norm > 0:
        for name, p in norm_parameters(model):
            p.requires_grad_(True)
            norms.append(p)
            named.append((name, p))
    groups = [{"params": scales, "lr": cfg.lr_scale}, {"params": zeros, "lr": cfg.lr_zero},
              {"params": norms, "lr": cfg.lr_norm}]
    opt = torch.optim.AdamW([g for g in groups if g["lr"] > 0], weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

    fp = _fingerprint(cfg, model, windows, world)
    ck_path = Path(cfg.checkpoint_dir) / CKPT_NAME if cfg.checkpoint_dir else None
    report = E2EReport()
    start = 0
    if cfg.resume and ck_path is not None and ck_path.exists():
        meta, payload = ckpt.load(ck_path, expect={"stage": "e2e", "fingerprint": fp})
        start = int(meta["next_epoch"])
        missing = set(_qparam_state(model, copy=False)) - set(payload["qparams"])
        if missing:
            raise ckpt.CheckpointError(f"{ck_path}: no saved values for {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, m in gqs_modules(model).items():
                m.scale.copy_(payload["qparams"][name + ".scale"])
                m.zero.copy_(payload["qparams"][name + ".zero"])
            for name, p in norm_parameters(model):
                p.copy_(payload["qparams"][name])
        opt.load_state_dict(payload["optimizer"])
        report.step_loss, report.epoch_loss = list(payload["step_loss"]), list(payload["epoch_loss"])
        report.seconds = list(payload["seconds"])
        if rank == 0:
            log(f"E2E-OQP: resumed from {ck_path} after epoch {start - 1}")
    report.resumed_from = start
    # AdamW from the gradient hooks (cfg.step_in_backward): one process, no GradScaler (both need
    # every gradient before the step: all_reduce, the inf check)
    in_backward = cfg.step_in_backward and dist is None and scaler is None
    relative = cfg.scale_step == "relative"
    if scaler is not None:
        clash = ([(f"moments {cfg.moments!r}", "moments fp32")] if cfg.moments != "fp32" else []) + \
                ([(f"scale steps {cfg.scale_step!r}", "absolute scale steps")] if relative else [])
        if clash:
            raise TrainingError(f"E2E-OQP: {' and '.join(c for c, _ in clash)} cannot be stepped through fp16's "
                                f"GradScaler; use {' and '.join(f for _, f in clash)}, or amp bf16 or none")
    stepper = (ParamStepper(opt, cfg.moments, relative=scales if relative else ())
               if in_backward or cfg.moments != "fp32" or relative else None)
    if in_backward:
        stepper.hook()
    report.stepped_in_backward = in_backward
    try:
        _epochs(model, windows, cfg, opt, scaler, stepper, in_backward, teacher, scales + zeros + norms, named,
                report, start, n, device, dist, rank, world, max_steps, fp, ck_path, on_epoch_end, log)
    finally:
        if stepper is not None:
            stepper.remove()
    for p in model.parameters():
        p.requires_grad_(False)
    return report


def lr_factor(step: int, total: int, decay: float) -> float:
    """The learning rates' multiplier at optimizer step `step` (0-based) of `total`: 1, then over
    the last round(decay * total) steps a linear fall towards 0 — (total - step) / (n + 1), so the
    last step still moves the parameters (at 1/(n+1) of the rate)."""
    n = round(decay * total)
    return 1.0 if step < total - n else (total - step) / (n + 1)


def _epochs(model, windows, cfg, opt, scaler, stepper, in_backward, teacher, params, named, report, start, n,
            device, dist, rank, world, max_steps, fp, ck_path, on_epoch_end, log) -> None:
    """run_e2e's epochs (from `start`): the steps, the per-epoch log, checkpoint and callback."""
    from tqdm.auto import tqdm

    steps = n // cfg.batch_size                         # the tail that does not fill a batch is dropped
    if max_steps is not None:
        steps = min(steps, max_steps)
    local = cfg.batch_size // world
    n_micro = local // cfg.micro_batch
    for g in opt.param_groups:                          # the rates the schedule scales (kept in checkpoints)
        g.setdefault("initial_lr", g["lr"])
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        gen = seeded(cfg.seed, "e2e", epoch)
        perm = torch.randperm(n, generator=gen)
        bar = tqdm(total=steps, desc=f"E2E-OQP epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not cfg.progress or rank != 0)
        epoch_losses = []
        for step in range(steps):
            where = f"E2E-OQP epoch {epoch} step {step}"
            f = lr_factor(epoch * steps + step, cfg.epochs * steps, cfg.lr_decay)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * f
            gidx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            lidx = gidx[rank * local:(rank + 1) * local]
            opt.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), dtype=torch.float64)
            for m in range(n_micro):
                if in_backward:                        # accumulate, then step on the last micro-batch
                    stepper.armed = m == n_micro - 1
                rows = lidx[m * cfg.micro_batch:(m + 1) * cfg.micro_batch]
                ids = windows[rows].to(device)
                with autocast(device, cfg.amp):
                    logits = model(input_ids=ids, use_cache=False).logits
                if cfg.loss == "kd":
                    loss = distillation_loss(logits, teacher, ids, device, cfg.amp, rows=rows)
                else:
                    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1))
                check_finite(f"{where} (rank {rank})", loss)
                part = loss * (cfg.micro_batch / cfg.batch_size)   # share of the global mean
                (scaler.scale(part) if scaler is not None else part).backward()
                step_loss += part.detach().double().cpu()
            if dist is not None:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                dist.all_reduce(step_loss, op=dist.ReduceOp.SUM)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            elif stepper is None:
                opt.step()
            elif not in_backward:
                stepper.step_all()                     # bf16 moments: one parameter at a time
            # in_backward: the hooks have stepped every parameter and freed its gradient
            check_finite(where, None, named)
            report.step_loss.append(float(step_loss))
            epoch_losses.append(float(step_loss))
            bar.update(1)
            bar.set_postfix(loss=f"{float(step_loss):.4f}")
        bar.close()
        report.epoch_loss.append(sum(epoch_losses) / max(1, len(epoch_losses)))
        report.seconds.append(time.time() - t0)
        if rank == 0:
            log(f"E2E-OQP epoch {epoch}: mean loss {report.epoch_loss[-1]:.4f} in {report.seconds[-1]:.1f} s")
            if ck_path is not None:
                ckpt.save(ck_path, {"stage": "e2e", "fingerprint": fp, "next_epoch": epoch + 1},
                          {"qparams": _qparam_state(model, copy=False), "optimizer": opt.state_dict(),
                           "step_loss": report.step_loss, "epoch_loss": report.epoch_loss,
                           "seconds": report.seconds})
        if dist is not None:
            dist.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
