"""streamed_train: BQPO and E2E-OQP over a checkpoint read a block at a time give what the
whole-model stages give — BQPO's trained blocks (the same loop on the same blocks), and one
E2E-OQP epoch's scales, zeros and norm gains to float tolerance, with the teacher's logits
recomputed from the float model's final hidden states instead of a float model."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

import tiny_models
from gqsa_gguf import oneshot, streamed, streamed_train
from gqsa_gguf.bqpo import BQPOConfig, compressed_from_model, run_bqpo
from gqsa_gguf.config import CompressionConfig
from gqsa_gguf.e2e import E2EConfig, _qparam_state, frozen_from_oneshot, run_e2e
from gqsa_gguf.fakequant import PackedGQSLinear, gqs_modules
from gqsa_gguf.model_io import inspect_checkpoint, load_model

KINDS = {
    "llama (tied)": ("llama", {}),
    "llama untied": ("llama", {"tie": False}),
    "qwen2 (biases)": ("qwen2", {}),
}


def _quiet(*a):
    pass


def _oneshot(kind, folder_out):
    name, kw = KINDS[kind]
    folder = tiny_models.checkpoint(name, **kw)
    info = inspect_checkpoint(folder)
    windows = tiny_models.token_windows(folder, n=6, seqlen=32)
    store = streamed.BlockStore(folder_out, "fp", info.n_layers, info.layout.linears)
    for res, _ in oneshot.compress_blocks(streamed.StreamedModel(info), info, windows,
                                          CompressionConfig.from_spec("w4s50"), batch_size=4, progress=False):
        store.put(res)
    return info, windows, store


def _e2e_cfg(**kw):
    return E2EConfig(**{"epochs": 1, "loss": "kd", "batch_size": 2, "progress": False, **kw})


def _whole_model_e2e(info, windows, store, cfg):
    float_model = load_model(info)
    qm = copy.deepcopy(float_model)
    frozen_from_oneshot(qm, {n: store[n].unpack() for n in store})
    start = _qparam_state(qm)
    rep = run_e2e(qm, windows, cfg, log=_quiet, teacher=float_model if cfg.loss == "kd" else None)
    return start, _qparam_state(qm), rep


def _close(got: dict, ref: dict, start: dict, rtol: float):
    """got equals ref to `rtol` of how far training moved ref from `start` (and training moved it)."""
    assert got.keys() == ref.keys()
    moved = max(float((ref[k] - start[k]).abs().max()) for k in ref)
    assert moved > 1e-5, "training did not move anything: the comparison would prove nothing"
    worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert worst <= rtol * moved, (worst, moved)


@pytest.mark.parametrize("kind", list(KINDS))
def test_streamed_e2e_epoch_equals_the_whole_model_one(kind, tmp_path):
    info, windows, store = _oneshot(kind, tmp_path)
    cfg = _e2e_cfg()
    start, ref, rep_ref = _whole_model_e2e(info, windows, store, cfg)
    student, rep = streamed_train.run_e2e_streamed(streamed.StreamedModel(info), store, windows, cfg, batch_size=4,
                                                   log=_quiet, hidden_dtype=torch.float32)
    mods = gqs_modules(student)
    assert len(mods) == 7 * info.n_layers and all(isinstance(m, PackedGQSLinear) for m in mods.values())
    assert not any(isinstance(m, torch.nn.Linear) for m in student.model.layers.modules())
    np.testing.assert_allclose(rep.step_loss, rep_ref.step_loss, rtol=1e-5)
    _close(_qparam_state(student), ref, start, rtol=1e-3)
    # the teacher's hidden states kept in fp16 (the default): the same to fp16's precision
    student16, rep16 = streamed_train.run_e2e_streamed(streamed.StreamedModel(info), store, windows, cfg,
                                                       batch_size=4, log=_quiet)
    np.testing.assert_allclose(rep16.step_loss, rep_ref.step_loss, rtol=2e-2)
    _close(_qparam_state(student16), ref, start, rtol=0.2)


def test_streamed_e2e_cross_entropy_and_the_blocks_written_back(tmp_path):
    info, windows, store = _oneshot("qwen2 (biases)", tmp_path / "oneshot")
    cfg = _e2e_cfg(loss="ce", lr_norm=0.0)
    start, ref, _ = _whole_model_e2e(info, windows, store, cfg)
    student, _ = streamed_train.run_e2e_streamed(streamed.StreamedModel(info), store, windows, cfg, log=_quiet)
    got = _qparam_state(student)
    _close(got, ref, start, rtol=1e-3)
    out = streamed.BlockStore(tmp_path / "e2e", "fp", info.n_layers, info.layout.linears)
    streamed_train.put_blocks(student, out)
    for name, m in gqs_modules(student).items():
        cl = out[name].unpack()
        for a, b in zip((cl.indices, cl.q, cl.z, cl.d), m.export_arrays()):
            np.testing.assert_array_equal(a, b)
        scale, zero = out.qparams(name)
        assert torch.equal(scale, m.scale.detach()) and torch.equal(zero, m.zero.detach())
    assert store.qparams(next(iter(store))) == (None, None)        # the one-shot rows carry no float values


@pytest.mark.parametrize("target", ["float-block", "float-chain"])
def test_streamed_bqpo_equals_the_whole_model_one(target, tmp_path):
    info, windows, store = _oneshot("qwen2 (biases)", tmp_path / "oneshot")
    cfg = BQPOConfig(epochs=1, target=target, progress=False)
    qm, rep_ref = run_bqpo(load_model(info), {n: store[n].unpack() for n in store}, windows, cfg, log=_quiet)
    ref = compressed_from_model(qm)
    out, rep = streamed_train.run_bqpo_streamed(streamed.StreamedModel(info), store, windows, cfg, tmp_path / "bqpo",
                                                "fp", log=_quiet)
    np.testing.assert_allclose(rep.loss_after, rep_ref.loss_after, rtol=1e-5)
    np.testing.assert_allclose(rep.loss_before, rep_ref.loss_before, rtol=1e-5)
    changed = 0
    for name, cl in ref.items():
        got = out[name].unpack()
        np.testing.assert_array_equal(got.indices, cl.indices)
        assert np.mean(got.q == cl.q) > 0.999 and np.mean(got.z == cl.z) > 0.999, name
        np.testing.assert_allclose(got.d.astype(np.float32), cl.d.astype(np.float32), rtol=2e-3)
        m = qm.get_submodule(name)
        scale, zero = out.qparams(name)
        torch.testing.assert_close(scale, m.scale.detach(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(zero, m.zero.detach(), rtol=1e-4, atol=1e-5)
        changed += int((got.q != store[name].unpack().q).sum())
    assert changed > 0, "BQPO changed no code: the comparison would prove nothing"


def test_the_e2e_estimate_counts_what_the_student_holds(tmp_path):
    """memory.py's streamed E2E-OQP terms are the student's tensors: the frozen codes and indices,
    the scales and zeros, and the float32 embeddings, head, norms and biases — nothing else."""
    from gqsa_gguf import memory

    info, windows, store = _oneshot("qwen2 (biases)", tmp_path)
    student = streamed_train.student_model(streamed.StreamedModel(info), store)
    mods = gqs_modules(student)
    kept = sum(m.out_features * m.n_kept * 16 for m in mods.values())
    assert kept == 0.5 * memory.model_sizes(info).linear              # w4s50 keeps half of every row
    terms = memory.estimate(info, MemorySettings_(), "streamed", checkpoint_bytes=1).stage("e2e").terms
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    assert nbytes([t for m in mods.values() for t in (m.qs, m.indices)]) == terms["frozen codes + indices"]
    assert nbytes([t for m in mods.values() for t in (m.scale, m.zero)]) == terms["scale/zero"]
    rest = {id(t): t for n, t in list(student.named_parameters()) + list(student.named_buffers())
            if (not any(n.startswith(m + ".") for m in mods) or n.endswith(".bias")) and "rotary" not in n}
    assert sum(n.endswith(".bias") for n, _ in student.named_buffers()) == 3 * info.n_layers     # q/k/v biases
    assert all(t.dtype == torch.float32 for t in rest.values())
    assert nbytes(rest.values()) == terms["embeddings f32"] + terms["head + norms + biases f32"]


def MemorySettings_():
    from gqsa_gguf.memory import MemorySettings

    return MemorySettings(nsamples=6, seqlen=32, bqpo_epochs=1, e2e_epochs=1, sparsity=0.5)


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_the_e2e_estimate_counts_the_optimizer_and_the_gradients(moments, tmp_path, monkeypatch):
    """With one backward a step (micro-batch = batch, what the converter runs where memory.py says it
    holds less) AdamW is stepped from the gradient hooks: the moments the optimizer keeps (read back
    from e2e.ckpt, written from the optimizer's own state) are the estimate's "AdamW moments", and
    the gradients alive at any step are at most its "scale/zero grad" (one linear's)."""
    from gqsa_gguf import e2e, memory
    from gqsa_gguf import checkpoint as ckpt

    info, windows, store = _oneshot("qwen2 (biases)", tmp_path / "oneshot")
    seen = []
    step = e2e.ParamStepper.step

    def spy(self, p):
        seen.append(sum(q.grad.numel() * q.grad.element_size() for q in self.subs
                        if q.grad is not None and q.dim() == 2))         # scales and zeros [rows, kept]
        step(self, p)

    monkeypatch.setattr(e2e.ParamStepper, "step", spy)
    cfg = _e2e_cfg(micro_batch=2, moments=moments, checkpoint_dir=str(tmp_path / "ck"))
    student, rep = streamed_train.run_e2e_streamed(streamed.StreamedModel(info), store, windows, cfg, log=_quiet)
    assert rep.stepped_in_backward and seen
    s = dataclasses.replace(MemorySettings_(), e2e_micro_batch=2, e2e_moments=moments)
    assert memory.e2e_micro_batch(info, s) == 2
    terms = memory.estimate(info, s, "streamed", checkpoint_bytes=1).stage("e2e").terms
    mods = gqs_modules(student)
    _, payload = ckpt.load(tmp_path / "ck" / "e2e.ckpt")
    n_q = 2 * len(mods)                                  # param groups: scales, zeros, then the norm gains
    state = payload["optimizer"]["state"]
    assert len(state) == n_q + len(e2e.norm_parameters(student))
    moment_bytes = sum(t.numel() * t.element_size() for i, st in state.items() if i < n_q
                       for t in (st["exp_avg"], st["exp_avg_sq"]))
    assert moment_bytes == terms["AdamW moments"]
    assert 0 < max(seen) <= terms["scale/zero grad"] < terms["scale/zero"] / info.n_layers
    # the step after the backward (or accumulated micro-batches) holds every gradient: the whole term
    held = memory.estimate(info, dataclasses.replace(s, e2e_step_in_backward=False), "streamed",
                           checkpoint_bytes=1).stage("e2e").terms
    assert held["scale/zero grad"] == terms["scale/zero"]


@pytest.mark.parametrize("micro_batch", [2, 1], ids=["one backward a step", "two micro-batches"])
def test_streamed_e2e_steps_in_the_backward_as_after_it(micro_batch, tmp_path):
    """The streamed student (PackedGQSLinear, every layer recomputed under activation checkpointing):
    AdamW stepped from the gradient hooks — while later layers' recomputations and backwards are
    still to come — gives the scales, zeros, norm gains and losses of one step after the backward,
    bit for bit."""
    info, windows, store = _oneshot("llama untied", tmp_path)
    got = {}
    for hooked in (False, True):
        cfg = _e2e_cfg(micro_batch=micro_batch, step_in_backward=hooked)
        student, rep = streamed_train.run_e2e_streamed(streamed.StreamedModel(info), store, windows, cfg, log=_quiet)
        assert rep.stepped_in_backward == hooked
        got[hooked] = (_qparam_state(student), rep.step_loss)
    _same_training(info, store, got[False], got[True])


def _same_training(info, store, one, other):
    """Two streamed E2E-OQP runs' (qparam state, step losses) are bit-identical, and training moved
    something (else the comparison would prove nothing)."""
    (a, la), (b, lb) = one, other
    assert la == lb
    start = _qparam_state(streamed_train.student_model(streamed.StreamedModel(info), store))
    assert any(not torch.equal(a[k], start[k]) for k in a), "training moved nothing: the comparison proves nothing"
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_streamed_e2e_without_layer_checkpointing_trains_the_same(tmp_path):
    """The streamed student with every layer's activations kept (checkpointed=False, what
    memory.e2e_checkpointing picks for small models) trains the scales, zeros and norm gains of the
    checkpointed one bit for bit, with the same losses: only the recomputation is left out."""
    info, windows, store = _oneshot("qwen2 (biases)", tmp_path)
    got = {}
    for checkpointed in (True, False):
        student, rep = streamed_train.run_e2e_streamed(streamed.StreamedModel(info), store, windows, _e2e_cfg(),
                                                       log=_quiet, checkpointed=checkpointed)
        got[checkpointed] = (_qparam_state(student), rep.step_loss)
    _same_training(info, store, got[True], got[False])
