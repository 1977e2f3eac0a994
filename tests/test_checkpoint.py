"""Checkpoint files: round trip, atomic replacement, and refusal of torn/corrupt/foreign files."""

import pytest
import torch

from gqsa_gguf import checkpoint as ckpt


def test_round_trip_and_meta(tmp_path):
    p = tmp_path / "a.ckpt"
    ckpt.save(p, {"stage": "x", "n": 3}, {"t": torch.arange(5.0), "l": [1.5, 2.0]})
    meta, payload = ckpt.load(p, expect={"stage": "x"})
    assert meta["n"] == 3 and torch.equal(payload["t"], torch.arange(5.0)) and payload["l"] == [1.5, 2.0]
    ckpt.save(p, {"stage": "x", "n": 4}, {"t": torch.zeros(1)})          # replaced atomically
    assert ckpt.load(p)[0]["n"] == 4
    assert [f.name for f in tmp_path.iterdir()] == ["a.ckpt"]              # no temp files left


def test_refuses_bad_files(tmp_path):
    p = tmp_path / "a.ckpt"
    ckpt.save(p, {"stage": "x"}, {"t": torch.arange(100.0)})
    raw = p.read_bytes()
    with pytest.raises(ckpt.CheckpointError, match="different run"):
        ckpt.load(p, expect={"stage": "y"})
    p.write_bytes(raw[:-10])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load(p)
    p.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.load(p)
    p.write_bytes(b"PK\x03\x04" + raw[4:])
    with pytest.raises(ckpt.CheckpointError, match="not a gqsa-gguf checkpoint"):
        ckpt.load(p)


def test_fingerprint_sensitivity():
    a = ckpt.run_fingerprint({"lr": 1e-5}, torch.arange(4))
    assert a == ckpt.run_fingerprint({"lr": 1e-5}, torch.arange(4))
    assert a != ckpt.run_fingerprint({"lr": 1e-4}, torch.arange(4))
    assert a != ckpt.run_fingerprint({"lr": 1e-5}, torch.arange(4).float())


def test_payload_larger_than_a_chunk_and_a_failed_save(tmp_path):
    """The payload is streamed through a file in chunks (save) and hashed and read back in chunks
    (load): a payload of several chunks comes back exactly; a save that fails leaves nothing."""
    p = tmp_path / "big.ckpt"
    big = torch.randn(3 * ckpt._CHUNK // 4 + 17, generator=torch.Generator().manual_seed(0))   # ~3 chunks
    ckpt.save(p, {"stage": "x"}, {"big": big, "n": 7})
    meta, payload = ckpt.load(p, expect={"stage": "x"})
    assert torch.equal(payload["big"], big) and payload["n"] == 7
    with pytest.raises(Exception):
        ckpt.save(tmp_path / "bad.ckpt", {"stage": "x"}, {"f": lambda: 0})        # cannot be pickled
    assert sorted(f.name for f in tmp_path.iterdir()) == ["big.ckpt"]
    raw = p.read_bytes()
    p.write_bytes(raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 1]) + raw[len(raw) // 2 + 1:])
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.load(p)
