"""streamed: a checkpoint read one block at a time computes what the loaded model computes, bit for
bit — the block inputs, every block, the one-shot result and the sensitivity curves, and the whole
converted file; the finished blocks kept on disk read back exactly; the converter never loads the
model whole without training; an interrupted streamed one-shot resumes from its last saved block."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

import tiny_models
from gqsa_gguf import checkpoint as ckpt
from gqsa_gguf import codec
from gqsa_gguf import oneshot, pipeline, streamed
from gqsa_gguf.config import CONVERT_E2E, CalibConfig, CompressionConfig, ConvertConfig
from gqsa_gguf.export import export_gguf
from gqsa_gguf.gguf_io import read_gguf
from gqsa_gguf.model_io import inspect_checkpoint, load_model, rope_freq_factors

KINDS = {
    "llama (tied)": ("llama", {}),
    "llama3 rope, untied": ("llama", {"llama3_rope": True, "tie": False}),
    "qwen2 (biases)": ("qwen2", {}),
    "qwen3 (q/k norms)": ("Qwen3ForCausalLM", {"config": {"head_dim": 32}}),
}


def _setup(kind):
    name, kw = KINDS[kind]
    folder = tiny_models.checkpoint(name, **kw)
    info = inspect_checkpoint(folder)
    return folder, info, load_model(info), tiny_models.token_windows(folder, n=6, seqlen=32)


@pytest.mark.parametrize("kind", list(KINDS))
def test_blocks_and_inputs_equal_the_loaded_model(kind):
    folder, info, model, windows = _setup(kind)
    sm = streamed.StreamedModel(info)
    got_h, got_kw = sm.layer0_inputs(windows, 4)
    ref_h, ref_kw = oneshot.ModelBlocks(model, info).layer0_inputs(windows, 4)
    assert all(torch.equal(a, b) for a, b in zip(got_h, ref_h)) and len(got_h) == len(ref_h)
    assert got_kw[0].keys() == ref_kw[0].keys() and all(_eq(got_kw[0][k], ref_kw[0][k]) for k in ref_kw[0])
    assert sm.model.model.embed_tokens.weight.is_meta               # freed after embedding
    for i in range(info.n_layers):
        ref = model.model.layers[i].state_dict()
        with sm.block(i) as layer:
            got = layer.state_dict()
            assert got.keys() == ref.keys()
            assert all(torch.equal(got[k], ref[k]) for k in ref)
            x = got_h[0]
            assert torch.equal(oneshot.layer_output(layer(x, **got_kw[0])),
                               oneshot.layer_output(model.model.layers[i](x, **ref_kw[0])))
        assert all(p.is_meta for p in layer.parameters())            # freed when the block is left
    sd, ref = sm.state_dict(), model.state_dict()
    assert list(sd) == list(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    if info.rope_type != "default":
        np.testing.assert_array_equal(rope_freq_factors(sm.model, info), rope_freq_factors(model, info))


def _eq(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    return a == b


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        for f in ("indices", "q", "z", "d"):
            np.testing.assert_array_equal(getattr(a[n], f), getattr(b[n], f), err_msg=f"{n}.{f}")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("how", [{}, {"target": "float"}, {"method": "rtn"}, {"method": "rtn", "sequential": False}])
def test_streamed_oneshot_equals_whole_model(kind, how):
    """The streamed and the whole-model one-shot give the same compressed tensors, bit for bit
    (and the sensitivity probe the same curves)."""
    folder, info, model, windows = _setup(kind)
    cfg = CompressionConfig.from_spec("w4s50", **how)
    keep = None
    if not how:
        ref = oneshot.sensitivity_curves(copy.deepcopy(model), info, windows, cfg, progress=False)
        got = oneshot.sensitivity_curves(streamed.StreamedModel(info), info, windows, cfg, progress=False)
        assert got == ref
        from gqsa_gguf.allocation import allocate
        keep = allocate(ref, cfg.sparsity)
    ref = oneshot.compress_model(copy.deepcopy(model), info, windows, cfg, batch_size=4, progress=False, keep=keep)
    got = oneshot.compress_model(streamed.StreamedModel(info), info, windows, cfg, batch_size=4, progress=False,
                                 keep=keep)
    _same(got.linears, ref.linears)
    assert got.rel_errors == ref.rel_errors


def test_block_store_round_trip_and_refusals(tmp_path):
    folder, info, model, windows = _setup("llama (tied)")
    cfg = CompressionConfig.from_spec("w4s50")
    store = streamed.BlockStore(tmp_path, "fp1", info.n_layers, info.layout.linears)
    results = []
    for res, _ in oneshot.compress_blocks(copy.deepcopy(model), info, windows, cfg, progress=False):
        store.put(res)
        results.append(res)
    assert store.complete(info.n_layers) and len(store) == 7 * info.n_layers
    every = {n: cl for res in results for n, cl in res.linears.items()}
    assert set(store) == set(every)
    _same({n: store[n].unpack() for n in store}, every)
    for n, cl in every.items():
        p = store[n]
        assert (p.rows, p.width, p.n_kept, p.sparsity) == (cl.rows, cl.width, cl.n_kept, cl.sparsity)
        perm = np.arange(cl.rows)[::-1].copy()
        np.testing.assert_array_equal(p.permute_rows(perm).packed_rows(), cl.permute_rows(perm).packed_rows())
    for other in ("model.layers.99.self_attn.q_proj", "model.layers.0.input_layernorm", "model.norm", None):
        assert other not in store
        with pytest.raises(KeyError):
            store[other]
    with pytest.raises(ckpt.CheckpointError, match="fingerprint"):
        streamed.BlockStore(tmp_path, "other run", info.n_layers, info.layout.linears)[next(iter(every))]


def _cfg(folder, out, allocation="sensitivity"):
    return ConvertConfig(model=str(folder), output=str(out),
                         compression=CompressionConfig.from_spec("w4s50", allocation=allocation),
                         calib=CalibConfig(source=str(tiny_models.calib_file(folder)), nsamples=6, seqlen=32,
                                           batch_size=4),
                         e2e=dataclasses.replace(CONVERT_E2E, epochs=0))


def _tensors(path):
    g = read_gguf(path)
    return {n: g.tensor_bytes(n).tobytes() for n in g.tensors}


@pytest.mark.parametrize("kind", ["llama (tied)", "qwen2 (biases)"])
def test_convert_streams_and_writes_the_whole_model_file(kind, tmp_path, monkeypatch):
    """convert (streamed, no training) never loads the model whole, and its file holds exactly the
    tensors of the whole-model one-shot + export on the same windows."""
    from gqsa_gguf import calib, model_io

    folder, info, model, _ = _setup(kind)
    cfg = _cfg(folder, tmp_path / "s.gguf")
    ids = calib.tokenize(model_io.load_tokenizer(info), calib.load_text(cfg.calib.source)[0])
    windows = calib.calibration_windows(ids, 6, 32, 0)
    keep = pipeline.choose_allocation(copy.deepcopy(model), info, windows, cfg.compression, progress=False,
                                      log=lambda *a: None)
    res = oneshot.compress_model(model, info, windows, cfg.compression, batch_size=4, progress=False, keep=keep)
    export_gguf(tmp_path / "w.gguf", info, model.state_dict(), res.linears, cfg,
                rope_factors=rope_freq_factors(model, info))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded whole")

    monkeypatch.setattr(model_io, "load_model", no_load)
    rep = pipeline.convert(cfg, progress=False, log=lambda *a: None)
    assert _tensors(tmp_path / "s.gguf") == _tensors(tmp_path / "w.gguf")
    # every stage's peak RSS so far is reported, a running maximum
    assert list(rep.peak_rss) == list(rep.seconds) == ["prepare", "allocate", "compress", "export"]
    peaks = list(rep.peak_rss.values())
    assert 0 < peaks[0] and peaks == sorted(peaks) and peaks[-1] <= pipeline.max_rss_bytes()


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("stop_in", ["sensitivity", "one-shot"])
def test_interrupted_streamed_oneshot_resumes_from_its_last_block(stop_in, tmp_path, monkeypatch):
    folder, info, _, _ = _setup("qwen2 (biases)")
    pipeline.convert(_cfg(folder, tmp_path / "ref.gguf"), progress=False, log=lambda *a: None)

    monkeypatch.setattr(pipeline, "CHAIN_SAVE_SECONDS", 0.0)          # save the chain after every block
    target = oneshot.sensitivity_block if stop_in == "sensitivity" else oneshot.compress_block
    calls = []

    def fail_at_block_1(layer, i, *a, **k):          # the first time block 1 is reached
        calls.append(i)
        if calls == [0, 1]:
            raise _Interrupted
        return target(layer, i, *a, **k)

    ck = tmp_path / "ck"
    monkeypatch.setattr(oneshot, target.__name__, fail_at_block_1)
    with pytest.raises(_Interrupted):
        pipeline.convert(_cfg(folder, tmp_path / "m.gguf"), progress=False, log=lambda *a: None,
                         checkpoint_dir=str(ck))
    assert not (tmp_path / "m.gguf").exists() and calls == [0, 1]
    calls.clear()
    logs = []
    pipeline.convert(_cfg(folder, tmp_path / "m.gguf"), progress=False, log=logs.append, checkpoint_dir=str(ck),
                     resume=True)
    assert calls == [1]
    if stop_in == "one-shot":
        assert any("resumed" in m and "at block 1" in m for m in logs)
    assert _tensors(tmp_path / "m.gguf") == _tensors(tmp_path / "ref.gguf")
    # resumed once more: the one-shot is done, nothing is recomputed
    monkeypatch.setattr(oneshot, "compress_block", None)
    monkeypatch.setattr(oneshot, "sensitivity_block", None)
    pipeline.convert(_cfg(folder, tmp_path / "m2.gguf"), progress=False, log=lambda *a: None,
                     checkpoint_dir=str(ck), resume=True)
    assert _tensors(tmp_path / "m2.gguf") == _tensors(tmp_path / "ref.gguf")


def test_convert_with_training_streams_and_matches_the_whole_model_training(tmp_path, monkeypatch):
    """convert with BQPO and E2E-OQP (distilled) never loads the model whole, and its file holds
    what the whole-model training (pipeline.train on the float model in memory, put in the
    streamed training's place) writes, to float tolerance: the same integer codes but for a
    rounding-boundary few, scales and norm gains within fp16's precision (the streamed teacher's
    hidden states are fp16)."""
    import contextlib
    from gqsa_gguf import model_io
    from gqsa_gguf.config import BQPOConfig, E2EConfig

    folder, info, _, _ = _setup("qwen2 (biases)")
    cfg = dataclasses.replace(_cfg(folder, tmp_path / "w.gguf", allocation="uniform"),
                              bqpo=BQPOConfig(epochs=1), e2e=E2EConfig(epochs=1, loss="kd", batch_size=2))
    @contextlib.contextmanager
    def whole_model_training(source, store, windows, e2e_windows, cfg, *a, **k):
        trained = pipeline.train(load_model(source.info), {n: store[n].unpack() for n in store}, windows,
                                 dataclasses.replace(cfg.bqpo, progress=False),
                                 dataclasses.replace(cfg.e2e, progress=False), log=lambda *a: None,
                                 e2e_windows=e2e_windows)
        yield trained.linears, trained.norms

    with monkeypatch.context() as m:
        m.setattr(pipeline, "_train_streamed", whole_model_training)
        pipeline.convert(cfg, progress=False, log=lambda *a: None)
    untrained = tmp_path / "u.gguf"
    pipeline.convert(dataclasses.replace(cfg, output=str(untrained), bqpo=BQPOConfig(epochs=0),
                                         e2e=E2EConfig(epochs=0)), progress=False, log=lambda *a: None)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded whole")

    monkeypatch.setattr(model_io, "load_model", no_load)
    rep = pipeline.convert(dataclasses.replace(cfg, output=str(tmp_path / "s.gguf")), progress=False,
                           log=lambda *a: None, checkpoint_dir=str(tmp_path / "ck"))
    assert {"bqpo", "e2e"} <= set(rep.seconds)
    assert (tmp_path / "ck" / "bqpo" / "bqpo.ckpt").is_file() and (tmp_path / "ck" / "e2e" / "e2e.ckpt").is_file()
    s, w, u = read_gguf(tmp_path / "s.gguf"), read_gguf(tmp_path / "w.gguf"), read_gguf(untrained)
    assert list(s.tensors) == list(w.tensors)
    trained = 0
    for name in w.tensors:
        if name in w.gqsa:
            (si, sq, sz, sd), (wi, wq, wz, wd) = (codec.unpack(f.gqsa_tensor(name)) for f in (s, w))
            np.testing.assert_array_equal(si, wi)
            assert np.mean(sq == wq) > 0.99 and np.mean(sz == wz) > 0.99, name
            np.testing.assert_allclose(sd.astype(np.float32), wd.astype(np.float32), rtol=5e-3)
            trained += int((codec.unpack(u.gqsa_tensor(name))[1] != wq).sum())
        else:
            np.testing.assert_allclose(s.tensor_array(name), w.tensor_array(name), rtol=1e-3, atol=1e-6)
    assert trained > 0, "training changed no code: the comparison would prove nothing"
