"""BQPO on a tiny random LLaMA: lowers block MSE, keeps masks, resumes bit-exactly, stops on NaN."""

import copy

import numpy as np
import pytest
import torch

from gqsa_gguf import codec
from gqsa_gguf.bqpo import BQPOConfig, compressed_from_model, run_bqpo
from gqsa_gguf.checkpoint import CheckpointError
from gqsa_gguf.config import ConfigError
from gqsa_gguf.fakequant import FrozenGQSLinear, gqs_modules
from gqsa_gguf.training import TrainingError

from tiny_llama import nan_gain, tiny_model, tiny_oneshot, tiny_windows


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_model()
    windows = tiny_windows()
    return model, windows, tiny_oneshot(model, windows)


def _cfg(**kw):
    base = dict(epochs=3, batch_size=4, lr_weight=1e-3, lr_scale=1e-3, lr_zero=1e-2, progress=False)
    base.update(kw)
    return BQPOConfig(**base)


def test_bqpo_lowers_block_mse_and_keeps_masks(setup):
    model, windows, comp = setup
    before = copy.deepcopy(model.state_dict())
    qm, rep = run_bqpo(model, comp, windows, _cfg(cache="disk"), log=lambda s: None)   # np.memmap caches
    assert len(rep.loss_after) == 2
    for b, a in zip(rep.loss_before, rep.loss_after):
        assert a < b, rep.summary()
    mods = gqs_modules(qm)
    assert len(mods) == 14 and all(isinstance(m, FrozenGQSLinear) for m in mods.values())
    out = compressed_from_model(qm)
    for name, cl in out.items():
        np.testing.assert_array_equal(cl.indices, comp[name].indices)   # masks fixed
        packed = codec.pack(cl.indices, cl.q, cl.z, cl.d)                # a valid gqsa4 tensor
        assert torch.equal(torch.from_numpy(codec.dequantize(packed, cl.width)), mods[name].dense_weight())
    for k, v in model.state_dict().items():                              # the float model is untouched
        assert torch.equal(v, before[k])


class _Interrupt(Exception):
    pass


def test_bqpo_resume_equals_uninterrupted(setup, tmp_path):
    cache = "memory"
    model, windows, comp = setup
    full, rep_full = run_bqpo(model, comp, windows, _cfg(epochs=1, cache=cache), log=lambda s: None)

    def stop(i):
        raise _Interrupt

    d = str(tmp_path / "ck")
    with pytest.raises(_Interrupt):
        run_bqpo(model, comp, windows, _cfg(epochs=1, cache=cache, checkpoint_dir=d), on_block_end=stop,
                 log=lambda s: None)
    resumed, rep = run_bqpo(model, comp, windows, _cfg(epochs=1, cache=cache, checkpoint_dir=d, resume=True),
                            log=lambda s: None)
    assert rep.resumed_from == 1
    assert rep.loss_after == rep_full.loss_after
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # a different run refuses the checkpoint
    with pytest.raises(CheckpointError, match="different run"):
        run_bqpo(model, comp, windows, _cfg(epochs=1, seed=5, checkpoint_dir=d, resume=True), log=lambda s: None)


def test_bqpo_nan_names_block_and_step(setup):
    model, windows, comp = setup
    with pytest.raises(TrainingError, match=r"BQPO block 0 epoch 0 step 0"):
        run_bqpo(nan_gain(copy.deepcopy(model)), comp, windows, _cfg(), log=lambda s: None)


def test_bqpo_config_validation():
    with pytest.raises(ConfigError, match="--resume needs"):
        BQPOConfig(resume=True)
    with pytest.raises(ConfigError, match="batch_size"):
        BQPOConfig(batch_size=0)
    with pytest.raises(TrainingError, match="fp16"):                # fp16 autocast is GPU-only
        run_bqpo(None, {}, None, BQPOConfig(amp="fp16"))
