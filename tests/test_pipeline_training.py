"""convert with BQPO + E2E-OQP on a tiny Qwen2 checkpoint (q/k/v biases): the training stages run
inside the pipeline, write checkpoints, resume, and produce a valid GGUF."""

import pytest

from gqsa_gguf.config import CalibConfig, CompressionConfig, ConvertConfig, ConfigError
from gqsa_gguf.pipeline import convert

from tiny_models import make_checkpoint, text


def _cfg(tmp_path, folder, out, **kw):
    calib = tmp_path / "calib.txt"
    calib.write_text(text() * 20)
    return ConvertConfig(model=str(folder), output=str(out),
                         compression=CompressionConfig.from_spec("w4s50", bqpo_epochs=1, e2e_epochs=1, **kw),
                         calib=CalibConfig(source=str(calib), nsamples=4, seqlen=32))


def test_convert_with_training_and_resume(tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt", "qwen2")
    ck = tmp_path / "train"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rep = convert(_cfg(tmp_path, folder, tmp_path / "a" / "m.gguf"), progress=False, log=lambda *a: None,
                  checkpoint_dir=str(ck))
    assert {"bqpo", "e2e"} <= set(rep.seconds) and (tmp_path / "a" / "m.gguf").stat().st_size > 0
    assert (ck / "bqpo" / "bqpo.ckpt").is_file() and (ck / "e2e" / "e2e.ckpt").is_file()
    # a finished run resumed: nothing left to train, the same file
    convert(_cfg(tmp_path, folder, tmp_path / "b" / "m.gguf"), progress=False, log=lambda *a: None,
            checkpoint_dir=str(ck), resume=True)
    a, b = (tmp_path / "a" / "m.gguf").read_bytes(), (tmp_path / "b" / "m.gguf").read_bytes()
    pa, pb = (str(tmp_path / d / "m.gguf").encode() for d in "ab")    # gqsa.config records the output path
    assert a.replace(pa, pb) == b


def test_resume_needs_checkpoint_dir(tmp_path):
    with pytest.raises(ConfigError, match="--checkpoint-dir"):
        convert(_cfg(tmp_path, tmp_path, tmp_path / "x.gguf"), resume=True)
