"""scripts/make_random_checkpoint.py: the folders load like any checkpoint, the vocabulary fits the
copied tokenizer, and writing holds one chunk at a time, not the model (peak RSS measured)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gqsa_gguf import model_io

pytestmark = pytest.mark.fast

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_random_checkpoint.py"


def load_script():
    """scripts/make_random_checkpoint.py as a module (registered first: its dataclasses need that)."""
    mod = sys.modules.get("make_random_checkpoint")
    if mod is None:
        spec = importlib.util.spec_from_file_location("make_random_checkpoint", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["make_random_checkpoint"] = mod
        spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mrc():
    return load_script()


@pytest.fixture(scope="module")
def tok_dir():
    return model_io.default_model_dir()


@pytest.mark.parametrize("shard_gb,tie", [(2.0, True), (0.004, False)])
def test_folder_loads_and_runs(mrc, tok_dir, tmp_path, shard_gb, tie):
    import torch

    shape = mrc.replace(mrc.PRESETS["tiny"], tie=tie, layers=3)
    folder = mrc.write_checkpoint(tmp_path / "ck", shape, seed=3, shard_gb=shard_gb, tokenizer_dir=tok_dir,
                                  log=lambda *a: None)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if shard_gb < 1:
        assert len(files) > 1 and (folder / "model.safetensors.index.json").is_file()
        wm = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        assert sorted(set(wm.values())) == files
    else:
        assert files == ["model.safetensors"]
    info = model_io.inspect_checkpoint(folder)
    assert (info.n_layers, info.hidden_size, info.tie_embeddings) == (3, 64, tie)
    assert info.vocab_size == mrc.tokenizer_size(tok_dir) == 49152
    model = model_io.load_model(info)
    n = sum(p.numel() for p in model.parameters())
    assert n == mrc.n_params(shape, info.vocab_size) == json.loads((folder / "gqsa_random.json").read_text())["params"]
    w = model.model.layers[1].mlp.down_proj.weight.detach()
    assert abs(float(w.std()) - mrc.INIT_STD) < 2e-3 and float(model.model.norm.weight.detach().min()) == 1.0
    tok = model_io.load_tokenizer(info)
    ids = torch.tensor([tok.encode("It is a truth universally acknowledged, 12 apples.")])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()


def test_same_values_whatever_the_sharding(mrc, tok_dir, tmp_path):
    from gqsa_gguf.lazy_checkpoint import LazyCheckpoint

    a = mrc.write_checkpoint(tmp_path / "a", mrc.PRESETS["tiny"], shard_gb=2, tokenizer_dir=tok_dir, log=lambda *x: None)
    b = mrc.write_checkpoint(tmp_path / "b", mrc.PRESETS["tiny"], shard_gb=0.001, tokenizer_dir=tok_dir,
                             log=lambda *x: None)
    with LazyCheckpoint(a) as ca, LazyCheckpoint(b) as cb:
        assert ca.names() == cb.names()
        for n in ca.names():
            assert ca.tensor(n).equal(cb.tensor(n)), n


def test_refusals(mrc, tok_dir, tmp_path):
    with pytest.raises(SystemExit, match="smaller than the copied tokenizer.*--vocab >= 49152"):
        mrc.write_checkpoint(tmp_path / "v", mrc.replace(mrc.PRESETS["tiny"], vocab=32000), tokenizer_dir=tok_dir)
    assert not (tmp_path / "v").exists()
    (tmp_path / "exists").mkdir()
    with pytest.raises(SystemExit, match="already exists"):
        mrc.write_checkpoint(tmp_path / "exists", mrc.PRESETS["tiny"], tokenizer_dir=tok_dir)
    with pytest.raises(SystemExit, match="heads"):
        mrc.write_checkpoint(tmp_path / "h", mrc.replace(mrc.PRESETS["tiny"], heads=3), tokenizer_dir=tok_dir)


def test_presets(mrc):
    one, seven = mrc.PRESETS["llama-1b"], mrc.PRESETS["llama-7b"]
    assert (one.hidden, one.layers, one.ffn, one.heads, one.kv_heads) == (2048, 22, 5632, 32, 4)
    assert (seven.hidden, seven.layers, seven.ffn, seven.heads, seven.kv_heads) == (4096, 32, 11008, 32, 32)
    # LLaMA-7B's 6.74B parameters with SmolLM2's 49152-token vocabulary instead of 32000: 6.88B, 13.8 GB F16
    assert mrc.n_params(seven, 49152) == 6_878_924_800
    assert mrc.n_params(seven, 32000) == 6_738_415_616


def _peak_rss_kb(args) -> int:
    """Peak RSS (kB) of the script run as its own process (os.wait4 reports that child alone)."""
    p = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.returncode == 0, err
    return usage.ru_maxrss


def test_peak_rss_is_a_chunk_not_the_model(tok_dir, tmp_path):
    """A 190 MB checkpoint is written with a peak RSS within 48 MB (a quarter of it) of the tiny one's."""
    common = ["--tokenizer-from", str(tok_dir)]
    small = _peak_rss_kb([str(tmp_path / "small"), "--preset", "tiny", *common])
    big_args = [str(tmp_path / "big"), "--hidden", "1024", "--layers", "4", "--ffn", "2816", "--heads", "16",
                "--kv-heads", "4", "--tie", *common]
    big = _peak_rss_kb(big_args)
    size = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    assert size > 180e6
    growth = (big - small) * 1024
    assert growth < size / 4, f"peak RSS grew by {growth / 1e6:.0f} MB writing {size / 1e6:.0f} MB"
