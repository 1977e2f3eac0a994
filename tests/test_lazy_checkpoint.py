"""lazy_checkpoint: one tensor / one block at a time from single-file and sharded checkpoints, equal
bit for bit to what model_io.load_model holds; clear refusals for what it cannot read."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import tiny_models
from gqsa_gguf import model_io
from gqsa_gguf.errors import GQSAError
from gqsa_gguf.lazy_checkpoint import INDEX_NAME, LazyCheckpoint, LazyCheckpointError

pytestmark = pytest.mark.fast

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def resave(src, dst, dtype: str = "F32", shards: int = 1, index: bool = True):
    """Copy of checkpoint `src` with its tensors in `dtype`, split into `shards` files (with the
    index file when shards > 1 and `index`)."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", INDEX_NAME))
    with LazyCheckpoint(src) as ck:
        names = ck.names()
        tensors = {n: ck.tensor(n).to(DTYPES[dtype]) for n in names}
    parts = [names[k::shards] for k in range(shards)]
    files = ["model.safetensors"] if shards == 1 else [f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
                                                        for k in range(shards)]
    for f, part in zip(files, parts):
        save_file({n: tensors[n] for n in part}, str(dst / f), metadata={"format": "pt"})
    if shards > 1 and index:
        (dst / INDEX_NAME).write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: f for f, part in zip(files, parts) for n in part}}))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy")
    llama = tiny_models.checkpoint("llama")
    return {
        "llama-f32": llama,
        "llama-f16-sharded": resave(llama, root / "f16", "F16", shards=3),
        "llama-bf16": resave(llama, root / "bf16", "BF16"),
        "qwen2-bf16-sharded": resave(tiny_models.checkpoint("qwen2"), root / "q2", "BF16", shards=2),
        "qwen3": tiny_models.checkpoint("Qwen3ForCausalLM", config={"head_dim": 32}),
        "llama-untied-f16": resave(tiny_models.checkpoint("llama", tie=False), root / "untied", "F16", shards=2),
    }


@pytest.mark.parametrize("which", ["llama-f32", "llama-f16-sharded", "llama-bf16", "qwen2-bf16-sharded", "qwen3",
                                   "llama-untied-f16"])
def test_every_tensor_equals_load_model(variants, which):
    folder = variants[which]
    info = model_io.inspect_checkpoint(folder)
    model = model_io.load_model(info)
    sd = model.state_dict()
    with LazyCheckpoint(folder, info.layout) as ck:
        assert ck.names(), folder
        for name in ck.names():
            t = ck.tensor(name)
            assert t.dtype == torch.float32 and t.is_contiguous()
            assert torch.equal(t, sd[name]), name
            assert ck.shape(name) == tuple(sd[name].shape)
            assert ck.rows(name, 1, 2).equal(sd[name][1:2])
        for i in range(info.n_layers):
            block = ck.block(i)
            assert set(block) == set(info.layout.block_tensors)
            for sub, t in block.items():
                assert torch.equal(t, sd[f"model.layers.{i}.{sub}"]), (i, sub)
        assert torch.equal(ck.embeddings(), model.model.embed_tokens.weight)
        assert torch.equal(ck.head(info.tie_embeddings), model.lm_head.weight)
        assert torch.equal(ck.final_norm(), model.model.norm.weight)
        if "sharded" in which:
            assert len({ck.shard(n) for n in ck.names()}) > 1


def test_random_checkpoint_script_folders(tmp_path):
    """The F16 shards of scripts/make_random_checkpoint.py (header written by hand) read the same."""
    from test_random_checkpoint import load_script

    mrc = load_script()
    folder = mrc.write_checkpoint(tmp_path / "r", mrc.PRESETS["tiny"], shard_gb=0.003,
                                  tokenizer_dir=model_io.default_model_dir(), log=lambda *a: None)
    assert (folder / INDEX_NAME).is_file()
    info = model_io.inspect_checkpoint(folder)
    sd = model_io.load_model(info).state_dict()
    with LazyCheckpoint(folder, info.layout) as ck:
        assert {ck.dtype(n) for n in ck.names()} == {"F16"}
        for name in ck.names():
            assert torch.equal(ck.tensor(name), sd[name]), name


# --- refusals --------------------------------------------------------------------------------------

def test_missing_tensor(variants):
    info = model_io.inspect_checkpoint(variants["llama-f32"])
    with LazyCheckpoint(info.folder, info.layout) as ck:
        with pytest.raises(LazyCheckpointError, match="no tensor 'model.layers.7.mlp.up_proj.weight'.*does not "
                                                      "match its config.json"):
            ck.tensor("model.layers.7.mlp.up_proj.weight")
        with pytest.raises(LazyCheckpointError, match="no tensor 'model.layers.7."):
            ck.block(7)
        with pytest.raises(LazyCheckpointError, match="lm_head.weight"):
            ck.head(tied=False)


def test_missing_shard(variants, tmp_path):
    folder = shutil.copytree(variants["llama-f16-sharded"], tmp_path / "c")
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(LazyCheckpointError, match="shard 'model-00002-of-00003.safetensors'.*missing.*incomplete"):
        LazyCheckpoint(folder)


def test_index_names_a_tensor_its_shard_lacks(variants, tmp_path):
    folder = shutil.copytree(variants["llama-f16-sharded"], tmp_path / "c")
    idx = json.loads((folder / INDEX_NAME).read_text())
    name = "model.norm.weight"
    other = next(f for f in set(idx["weight_map"].values()) if f != idx["weight_map"][name])
    idx["weight_map"][name] = other
    (folder / INDEX_NAME).write_text(json.dumps(idx))
    with LazyCheckpoint(folder) as ck:
        with pytest.raises(LazyCheckpointError, match=f"places '{name}' in this shard, but it does not hold it"):
            ck.tensor(name)


def test_unsupported_dtype(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(4, 4, dtype=torch.int8), "b": torch.zeros(4, dtype=torch.float64)},
              str(tmp_path / "model.safetensors"))
    with LazyCheckpoint(tmp_path) as ck:
        assert ck.dtype("a") == "I8"
        for name, dt in (("a", "I8"), ("b", "F64")):
            with pytest.raises(LazyCheckpointError, match=f"stored as {dt}.*F16, BF16, F32"):
                ck.tensor(name)


def test_duplicate_without_index_and_corrupt_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(LazyCheckpointError, match="tensor a is in both one.safetensors and two.safetensors"):
        LazyCheckpoint(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LazyCheckpointError, match="not a readable safetensors file"):
        LazyCheckpoint(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LazyCheckpointError, match="no \\*.safetensors"):
        LazyCheckpoint(tmp_path / "empty")


def test_errors_are_gqsa_errors(tmp_path):
    with pytest.raises(GQSAError, match="does not exist"):
        LazyCheckpoint(tmp_path / "nope")
    with pytest.raises(model_io.ModelError):
        LazyCheckpoint(tmp_path / "nope")


def test_reading_every_block_leaves_no_mapped_pages(tmp_path):
    """Reading the blocks of a 184 MB checkpoint (90 MB of them) three times over does not raise the
    peak RSS past the first block's: no memory map stays open between reads (with kept handles the
    touched pages stayed in RSS: +2.0 GB over the 22 blocks of a 2.3 GB 1B-shaped checkpoint)."""
    import subprocess
    import sys

    from test_random_checkpoint import load_script

    mrc = load_script()
    shape = mrc.Shape(hidden=1024, layers=4, ffn=2816, heads=16, kv_heads=4, tie=True)
    folder = mrc.write_checkpoint(tmp_path / "mid", shape, shard_gb=0.1, tokenizer_dir=model_io.default_model_dir(),
                                  log=lambda *a: None)
    code = (
        "import resource, sys\n"
        "from gqsa_gguf import model_io\n"
        "from gqsa_gguf.lazy_checkpoint import LazyCheckpoint\n"
        "info = model_io.inspect_checkpoint(sys.argv[1])\n"
        "with LazyCheckpoint(info.folder, info.layout) as ck:\n"
        "    ck.block(0)\n"
        "    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    for _ in range(3):\n"
        "        for i in range(info.n_layers):\n"
        "            ck.block(i)\n"
        "    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) * 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    growth = int(out.stdout.split()[-1])
    assert growth < 30e6, f"peak RSS grew by {growth / 1e6:.0f} MB reading 90 MB of blocks"
