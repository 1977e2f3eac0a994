"""E2E-OQP on a tiny random LLaMA: only scales/zeros change, resume is exact, DDP == one process."""

import dataclasses
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gqsa_gguf.config import ConfigError
from gqsa_gguf.e2e import E2EConfig, frozen_from_oneshot, lr_factor, norm_parameters, run_e2e
from gqsa_gguf.fakequant import gqs_modules
from gqsa_gguf.training import TrainingError

from tiny_llama import nan_gain, tiny_model, tiny_oneshot, tiny_windows

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    windows = tiny_windows()
    return windows, tiny_oneshot(model, windows)


def _frozen(comp):
    m = tiny_model()
    frozen_from_oneshot(m, comp)
    return m


def _cfg(**kw):
    base = dict(epochs=2, batch_size=4, micro_batch=2, lr_scale=1e-3, lr_zero=1e-1, progress=False)
    base.update(kw)
    return E2EConfig(**base)


def test_e2e_changes_only_scales_and_zeros(setup):
    windows, comp = setup
    model = _frozen(comp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = run_e2e(model, windows, _cfg(lr_norm=0.0), log=lambda s: None)
    assert len(rep.step_loss) == 4 and rep.epoch_loss[-1] < rep.step_loss[0] + 1.0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith((".scale", ".zero")) for k in changed), sorted(changed)[:5]
    assert any(k.endswith(".scale") for k in changed)
    for name, m in gqs_modules(model).items():               # q and masks bit-identical
        assert torch.equal(m.q, before[name + ".q"]) and torch.equal(m.indices, before[name + ".indices"])


def test_e2e_with_lr_norm_also_trains_the_norm_gains_and_resumes_them(setup, tmp_path):
    windows, comp = setup
    model = _frozen(comp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_e2e(model, windows, _cfg(lr_norm=1e-2), log=lambda s: None)
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    norms = {k for k in changed if k.endswith("norm.weight")}
    assert norms and {"model.norm.weight", "model.layers.0.input_layernorm.weight"} <= norms
    assert all(k.endswith((".scale", ".zero", "norm.weight")) for k in changed), sorted(changed)[:5]
    assert not any(p.requires_grad for p in model.parameters())
    # the gains are in the checkpoint: a resumed run equals an uninterrupted one
    d = str(tmp_path / "ck")
    part = _frozen(comp)
    with pytest.raises(_Interrupt):
        run_e2e(part, windows, _cfg(lr_norm=1e-2, checkpoint_dir=d), on_epoch_end=_stop, log=lambda s: None)
    resumed = _frozen(comp)
    run_e2e(resumed, windows, _cfg(lr_norm=1e-2, checkpoint_dir=d, resume=True), log=lambda s: None)
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


class _Interrupt(Exception):
    pass


def _stop(epoch):
    raise _Interrupt


def test_e2e_resume_equals_uninterrupted(setup, tmp_path):
    windows, comp = setup
    full = _frozen(comp)
    run_e2e(full, windows, _cfg(), log=lambda s: None)

    d = str(tmp_path / "ck")
    part = _frozen(comp)
    with pytest.raises(_Interrupt):
        run_e2e(part, windows, _cfg(checkpoint_dir=d), on_epoch_end=_stop, log=lambda s: None)
    resumed = _frozen(comp)                                   # a fresh process: nothing carried over
    rep = run_e2e(resumed, windows, _cfg(checkpoint_dir=d, resume=True), log=lambda s: None)
    assert rep.resumed_from == 1
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lr_factor_is_constant_then_falls_linearly():
    assert [lr_factor(i, 6, 0.0) for i in range(6)] == [1.0] * 6
    assert [lr_factor(i, 8, 0.25) for i in range(8)] == [1.0] * 6 + [2 / 3, 1 / 3]
    whole = [lr_factor(i, 4, 1.0) for i in range(4)]
    assert whole == [4 / 5, 3 / 5, 2 / 5, 1 / 5]          # the last step still moves


def _rates_used(monkeypatch, target):
    """Records the learning rate every AdamW step applies to `target` (in either stepping path)."""
    used = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        for g in self.param_groups:
            if any(p is target for p in g["params"]):
                used.append(g["lr"])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return used


@pytest.mark.parametrize("hooked", [True, False], ids=["stepped in the backward", "one step after the backward"])
def test_lr_decay_is_the_rate_adamw_applies_and_resumes(setup, tmp_path, monkeypatch, hooked):
    """With lr_decay 0.5 over 2 epochs of 2 steps, the rate AdamW applies to a scale is lr, lr,
    then 2/3 and 1/3 of it, in both stepping paths; a run interrupted after its first epoch resumes
    on the falling rates and ends where the uninterrupted one does, which differs from constant rates."""
    windows, comp = setup
    cfg = _cfg(lr_decay=0.5, step_in_backward=hooked)
    model = _frozen(comp)
    target = next(iter(gqs_modules(model).values())).scale
    used = _rates_used(monkeypatch, target)
    run_e2e(model, windows, cfg, log=lambda s: None)
    assert used == pytest.approx([1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3], rel=1e-12)

    d = str(tmp_path / "ck")
    with pytest.raises(_Interrupt):
        run_e2e(_frozen(comp), windows, dataclasses.replace(cfg, checkpoint_dir=d), on_epoch_end=_stop,
                log=lambda s: None)
    resumed = _frozen(comp)
    run_e2e(resumed, windows, dataclasses.replace(cfg, checkpoint_dir=d, resume=True), log=lambda s: None)
    constant = _frozen(comp)
    run_e2e(constant, windows, dataclasses.replace(cfg, lr_decay=0.0), log=lambda s: None)
    a, b, c = model.state_dict(), resumed.state_dict(), constant.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith(".scale"))


@pytest.mark.parametrize("hooked", [True, False])
def test_relative_scale_steps_move_each_scale_by_a_share_of_itself(setup, hooked):
    """scale_step 'relative': a step moves each scale by AdamW's update times the scale's magnitude
    before the step, so a scale ten times larger moves ten times as far; zero points and norm gains
    step as with absolute steps. One step from the same start: the first step's AdamW update is the
    same in both runs (the same forward and gradient), so relative = absolute's move times |scale|."""
    windows, comp = setup
    cfg = _cfg(epochs=1, lr_norm=1e-2, step_in_backward=hooked)
    start = _frozen(comp).state_dict()
    moved = {}
    for mode in ("absolute", "relative"):
        model = _frozen(comp)
        run_e2e(model, windows, dataclasses.replace(cfg, scale_step=mode), log=lambda s: None, max_steps=1)
        moved[mode] = model.state_dict()
    scales = [k for k in start if k.endswith(".scale")]
    assert scales
    for k in start:
        a, r = moved["absolute"][k], moved["relative"][k]
        if k.endswith(".scale"):
            want = start[k] + (a - start[k]) * start[k].abs()
            assert torch.allclose(r, want, rtol=1e-6, atol=1e-12), k
            assert not torch.equal(r, a), k
        else:
            assert torch.equal(r, a), k


def test_scale_step_is_in_the_resume_fingerprint_only_when_relative(setup, tmp_path):
    """A checkpoint of absolute steps is not resumed with relative ones (the run would mix two
    trainings); the default leaves the setting out of the fingerprint, so checkpoints written before
    it existed stay resumable."""
    from gqsa_gguf.checkpoint import CheckpointError
    assert "scale_step" not in _cfg().fingerprint_dict()
    assert _cfg(scale_step="relative").fingerprint_dict()["scale_step"] == "relative"
    windows, comp = setup
    d = str(tmp_path / "ck")
    with pytest.raises(_Interrupt):
        run_e2e(_frozen(comp), windows, _cfg(checkpoint_dir=d), on_epoch_end=_stop, log=lambda s: None)
    with pytest.raises(CheckpointError):
        run_e2e(_frozen(comp), windows, _cfg(checkpoint_dir=d, resume=True, scale_step="relative"),
                log=lambda s: None)


def test_unknown_scale_step_is_refused():
    with pytest.raises(ConfigError, match="--e2e-scale-step 'log': choose one of absolute, relative"):
        E2EConfig(scale_step="log")


def test_e2e_nan_names_epoch_and_step(setup):
    windows, comp = setup
    with pytest.raises(TrainingError, match=r"E2E-OQP epoch 0 step 0"):
        run_e2e(nan_gain(_frozen(comp)), windows, _cfg(), log=lambda s: None)


def test_e2e_batch_must_split_evenly(setup):
    windows, comp = setup
    with pytest.raises(TrainingError, match="multiple of world size"):
        run_e2e(_frozen(comp), windows, _cfg(batch_size=3, micro_batch=2), log=lambda s: None)


def test_torchrun_two_gloo_processes_equal_one_process(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed next to this python")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    if Path("/sys/class/net/lo").exists():    # gloo on loopback: the host name may name another interface
        env["GLOO_SOCKET_IFNAME"] = "lo"
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"

    def run(cmd, out):
        return subprocess.run(cmd + [str(HERE / "e2e_ddp_worker.py"), str(out)], env=env, timeout=300,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    single = run([sys.executable], one)
    assert single.returncode == 0, f"exit {single.returncode}:\n{single.stdout[-6000:]}"
    pair = run([torchrun, "--standalone", "--nproc_per_node", "2"], two)
    if pair.returncode != 0 and "SIGABRT" in pair.stdout:
        # gloo's I/O thread can abort a rank on a connection event (pytorch/gloo#514); seen on the
        # project's CI machine, not here: once more, the first run's output kept in a warning
        warnings.warn(f"torchrun aborted, run again; its output:\n{pair.stdout[-4000:]}")
        pair = run([torchrun, "--standalone", "--nproc_per_node", "2"], two)
    # the workers' own output (a rank's traceback or abort message) in the failure, not only torchrun's
    assert pair.returncode == 0, f"exit {pair.returncode}:\n{pair.stdout[-6000:]}"
    a, b = torch.load(one), torch.load(two)
    assert a["world"] == 1 and b["world"] == 2
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert any(k.endswith(".grad") for k in a["state"])
    eps = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults["eps"]   # e2e.py's optimizer
    for k, ref in a["state"].items():      # equal up to float summation order
        got = b["state"][k]
        tol = 1e-5 * ref.abs() + 1e-5 * float(ref.abs().max())
        if not k.endswith(".grad"):
            # Adam's first step moves an element by lr * g / (|g| + eps): where g is itself near
            # eps, the summation-order difference of the gradients (their .grad entries are
            # checked tightly) is magnified by lr * eps / (|g| + eps)^2. Twice that is allowed on top.
            ga, gb = a["state"][k + ".grad"], b["state"][k + ".grad"]
            lr = a["lr"][k.rsplit(".", 1)[1]]
            tol = tol + 2 * lr * eps * (ga - gb).abs() / (torch.minimum(ga.abs(), gb.abs()) + eps) ** 2
        bad = (got - ref).abs() > tol
        assert not bad.any(), f"{k}: {int(bad.sum())} elements differ, e.g. {got[bad][:3]} vs {ref[bad][:3]}"


def test_e2e_distillation_moves_towards_the_float_model(setup):
    from gqsa_gguf.e2e import distillation_loss

    windows, comp = setup
    teacher = tiny_model()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model = _frozen(comp)

    def kl():
        with torch.no_grad():
            return float(distillation_loss(model(input_ids=windows).logits, teacher, windows, torch.device("cpu"),
                                           "none"))

    before = kl()
    assert before > 0
    with torch.no_grad():                                      # KL of the teacher with itself is 0
        assert float(distillation_loss(teacher(input_ids=windows).logits, teacher, windows,
                                       torch.device("cpu"), "none")) < 1e-6
    rep = run_e2e(model, windows, _cfg(loss="kd", epochs=3), log=lambda s: None, teacher=teacher)
    assert kl() < before, (before, kl(), rep.step_loss)
    with pytest.raises(TrainingError, match="teacher"):
        run_e2e(_frozen(comp), windows, _cfg(loss="kd"), log=lambda s: None)


@pytest.mark.parametrize("micro_batch", [4, 2], ids=["one backward a step", "two micro-batches accumulated"])
def test_step_in_backward_equals_one_step_after_the_backward(setup, micro_batch):
    """AdamW stepped per parameter from the gradient hooks (the default) gives the scales, zeros, norm
    gains and losses of one optimizer step after the backward, bit for bit on the CPU — with the
    micro-batches accumulated before the hooks step (on the last one only)."""
    windows, comp = setup
    runs = {}
    for hooked in (False, True):
        model = _frozen(comp)
        rep = run_e2e(model, windows, _cfg(lr_norm=1e-2, micro_batch=micro_batch, step_in_backward=hooked),
                      log=lambda s: None)
        assert rep.stepped_in_backward == hooked
        runs[hooked] = (model.state_dict(), rep.step_loss)
    (a, loss_a), (b, loss_b) = runs[False], runs[True]
    assert loss_a == loss_b
    moved = [k for k in a if k.endswith((".scale", ".zero", "norm.weight"))
             and not torch.equal(a[k], _frozen(comp).state_dict()[k])]
    assert moved, "training moved nothing: the comparison would prove nothing"
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_step_in_backward_holds_one_linears_gradients_at_a_time(setup, monkeypatch):
    """Each parameter is stepped as soon as its gradient is complete and the gradient freed: at no
    point of a step (one backward) do more than one linear's scale and zero have a gradient (the
    step after the backward holds all of them), and none is left after training."""
    from gqsa_gguf import e2e

    windows, comp = setup
    seen = []
    step = e2e.ParamStepper.step

    def spy(self, p):
        seen.append(sum(q.grad is not None for q in self.subs))
        step(self, p)
        assert p.grad is None

    monkeypatch.setattr(e2e.ParamStepper, "step", spy)
    model = _frozen(comp)
    run_e2e(model, windows, _cfg(micro_batch=4, epochs=1), log=lambda s: None)
    n_params = 2 * len(gqs_modules(model)) + len(norm_parameters(model))     # scales, zeros, norm gains
    assert len(seen) == 2 * n_params                          # each stepped in both steps
    assert 1 <= max(seen) <= 2, max(seen)
    assert all(m.scale.grad is None and m.zero.grad is None for m in gqs_modules(model).values())


def test_bf16_moments_are_kept_in_bf16_and_train_close_to_fp32(setup, tmp_path):
    """moments="bf16": the optimizer state (and the checkpoint's) holds the two moments in bf16;
    the result stays within a tenth of how far training moved the fp32 one, but is not identical."""
    windows, comp = setup
    ref, start = _frozen(comp), _frozen(comp).state_dict()
    run_e2e(ref, windows, _cfg(micro_batch=4), log=lambda s: None)
    for hooked in (True, False):
        d = tmp_path / f"ck{hooked}"
        model = _frozen(comp)
        run_e2e(model, windows, _cfg(micro_batch=4, moments="bf16", step_in_backward=hooked, checkpoint_dir=str(d)),
                log=lambda s: None)
        from gqsa_gguf import checkpoint as ckpt
        _, payload = ckpt.load(d / "e2e.ckpt")
        st = payload["optimizer"]["state"]
        assert st and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in st.values())
        a, b = ref.state_dict(), model.state_dict()
        keys = [k for k in a if k.endswith((".scale", ".zero"))]
        moved = max(float((a[k] - start[k]).abs().max()) for k in keys)
        worst = max(float((a[k] - b[k]).abs().max()) for k in keys)
        assert 0 < worst <= 0.1 * moved, (worst, moved)


def test_bf16_moments_resume_equals_uninterrupted(setup, tmp_path):
    """The bf16 moments go through e2e.ckpt (load_state_dict casts them to the parameters' fp32;
    ParamStepper rounds them back, losslessly): a resumed run equals an uninterrupted one."""
    windows, comp = setup
    cfg = dict(micro_batch=4, moments="bf16")
    full = _frozen(comp)
    run_e2e(full, windows, _cfg(**cfg), log=lambda s: None)
    d = str(tmp_path / "ck")
    with pytest.raises(_Interrupt):
        run_e2e(_frozen(comp), windows, _cfg(**cfg, checkpoint_dir=d), on_epoch_end=_stop, log=lambda s: None)
    resumed = _frozen(comp)
    assert run_e2e(resumed, windows, _cfg(**cfg, checkpoint_dir=d, resume=True), log=lambda s: None).resumed_from == 1
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
