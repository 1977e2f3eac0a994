"""CLI and config: spec parsing, validation, and refusals that exit non-zero with a clear message
and leave no output file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_models
from gqsa_gguf import arch
from gqsa_gguf.cli import build_parser, convert_config_from_args, main
from gqsa_gguf.config import (BQPOConfig, CalibConfig, CompressionConfig, ConfigError, ConvertConfig, E2EConfig,
                              ExportConfig, parse_spec)

REPO = Path(__file__).resolve().parents[1]


# --- spec and config -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,bits,pct", [("w4s20", 4, 20), ("w4s50", 4, 50), ("w4s75", 4, 75),
                                          ("W4S50", 4, 50), ("w4s0", 4, 0), ("w4s99", 4, 99), ("w3s40", 3, 40)])
def test_parse_spec_accepts(spec, bits, pct):
    assert parse_spec(spec) == (bits, pct)


@pytest.mark.parametrize("spec,needle", [
    ("w5s50", "4-bit .gqsa4. or 3-bit"), ("w2s50", "use w4s50 or w3s50"), ("w4s100", "0..99"), ("w4sx", "wNsM"),
    ("w4", "wNsM"), ("s50", "wNsM"), ("", "wNsM"), ("w4s-5", "wNsM"), ("w4.5s50", "wNsM")])
def test_parse_spec_refuses(spec, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        parse_spec(spec)
    assert "--gqsa" in str(e.value)


def test_compression_config_from_spec_and_validation():
    c = CompressionConfig.from_spec("w4s75")
    assert (c.bits, c.sparsity, c.group_size) == (4, 0.75, 16)
    assert c.kept_groups(576) == 9 and c.kept_groups(1536) == 24
    with pytest.raises(ConfigError, match="group size of 16"):
        CompressionConfig.from_spec("w4s50", group_size=32)
    with pytest.raises(ConfigError, match="disagree"):
        CompressionConfig(spec="w4s50", bits=4, sparsity=0.25)
    with pytest.raises(ConfigError, match="damp"):
        CompressionConfig.from_spec("w4s50", damp=0.0)
    with pytest.raises(ConfigError, match="bqpo-epochs"):
        BQPOConfig(epochs=-1)
    with pytest.raises(ConfigError, match="--e2e-lr-norm"):
        E2EConfig(lr_norm=-1e-3)
    with pytest.raises(ConfigError, match="--e2e-lr-scale nan must be a finite"):
        E2EConfig(lr_scale=float("nan"))
    with pytest.raises(ConfigError, match="--e2e-lr-zero inf must be a finite"):
        E2EConfig(lr_zero=float("inf"))
    with pytest.raises(ConfigError, match="bqpo.lr_weight inf must be a finite"):
        BQPOConfig(lr_weight=float("inf"))
    with pytest.raises(ConfigError, match="e2e.weight_decay -0.1 must be a finite weight decay"):
        E2EConfig(weight_decay=-0.1)
    with pytest.raises(ConfigError, match="pass it to pipeline.convert"):
        ConvertConfig(e2e=E2EConfig(checkpoint_dir="ck"))
    with pytest.raises(ConfigError, match="nsamples"):
        CalibConfig(nsamples=0)
    with pytest.raises(ConfigError, match="seqlen"):
        CalibConfig(seqlen=4)
    with pytest.raises(ConfigError, match="dense-type"):
        ExportConfig(dense_type="q4_0")
    with pytest.raises(ConfigError, match="tokenizer-pre"):
        ExportConfig(tokenizer_pre="Not A Name")


def test_config_is_frozen_and_round_trips_json():
    cfg = ConvertConfig(model="m", output="o.gguf", compression=CompressionConfig.from_spec("w4s20", damp=0.05),
                        calib=CalibConfig(source="x.txt", nsamples=3, seqlen=64, seed=7),
                        export=ExportConfig(dense_type="q8_0", tokenizer_pre="qwen2"),
                        bqpo=BQPOConfig(epochs=1, lr_zero=3e-2, target="float-chain"),
                        e2e=E2EConfig(epochs=2, lr_norm=0.0, loss="ce"))
    with pytest.raises(Exception):
        cfg.output = "other"                                        # frozen
    back = ConvertConfig.from_json(cfg.to_json())
    assert back == cfg
    d = json.loads(cfg.to_json())
    assert d["compression"]["sparsity"] == 0.2
    assert d["bqpo"]["lr_zero"] == 3e-2 and d["e2e"]["lr_norm"] == 0.0 and d["e2e"]["loss"] == "ce"
    assert not {"checkpoint_dir", "resume", "progress"} & (set(d["bqpo"]) | set(d["e2e"]))   # run-only


def test_config_rejects_unknown_keys():
    d = ConvertConfig().to_dict()
    d["calib"]["n_samples"] = 3
    with pytest.raises(ConfigError, match=r"config\.calib: unknown key\(s\) \['n_samples'\]"):
        ConvertConfig.from_dict(d)
    d = ConvertConfig().to_dict()
    d["colour"] = "blue"
    with pytest.raises(ConfigError, match="unknown key"):
        ConvertConfig.from_dict(d)


def test_cli_builds_config_with_defaults():
    a = build_parser().parse_args(["convert", "some/folder", "-o", "x.gguf"])
    cfg = convert_config_from_args(a)
    assert cfg.model == "some/folder" and cfg.output == "x.gguf"
    assert cfg.compression.spec == "w4s50" and cfg.compression.sparsity == 0.5
    assert (cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.source) == (128, 512, "debian:calib-mix")
    assert cfg.export.dense_type == "f16" and cfg.export.tokenizer_pre is None
    assert cfg.bqpo == BQPOConfig(epochs=0, amp="auto") and cfg.e2e == E2EConfig(epochs=1, windows=384, loss="kd", amp="auto",
                                                                              chat_share=0.5, chat_replies="auto",
                                                                              moments="auto", batch_size=1,
                                                                              scale_step="relative", lr_scale=4e-3)
    a = build_parser().parse_args(["convert", "-o", "x.gguf", "--gqsa", "w4s75", "--nsamples", "4",
                                   "--seqlen", "32", "--dense-type", "q8_0", "--no-sequential",
                                   "--bqpo-epochs", "2", "--e2e-epochs", "0", "--seed", "5", "--device", "cuda"])
    cfg = convert_config_from_args(a)
    assert cfg.model.startswith("default:") and cfg.compression.sparsity == 0.75
    assert cfg.compression.sequential is False and cfg.export.dense_type == "q8_0"
    assert (cfg.bqpo.epochs, cfg.e2e.epochs) == (2, 0)
    assert cfg.calib.seed == cfg.bqpo.seed == cfg.e2e.seed == 5 and cfg.bqpo.device == cfg.e2e.device == "cuda"
    assert cfg.e2e.moments == "auto" and cfg.e2e.checkpointing == "auto"
    a = build_parser().parse_args(["convert", "x", "-o", "x.gguf", "--e2e-moments", "bf16"])
    assert convert_config_from_args(a).e2e.moments == "bf16"
    a = build_parser().parse_args(["convert", "x", "-o", "x.gguf", "--e2e-seqlen", "256", "--e2e-windows", "64"])
    e2e = convert_config_from_args(a).e2e
    assert (e2e.seqlen, e2e.windows) == (256, 64)
    a = build_parser().parse_args(["convert", "x", "-o", "x.gguf", "--e2e-lr-decay", "0.25"])
    assert convert_config_from_args(a).e2e.lr_decay == 0.25
    # relative scale steps by default, each kind of step with its own default rate unless one is given
    a = build_parser().parse_args(["convert", "x", "-o", "x.gguf"])
    assert (convert_config_from_args(a).e2e.scale_step, convert_config_from_args(a).e2e.lr_scale) == ("relative", 4e-3)
    a = build_parser().parse_args(["convert", "x", "-o", "x.gguf", "--e2e-scale-step", "absolute"])
    assert (convert_config_from_args(a).e2e.scale_step, convert_config_from_args(a).e2e.lr_scale) == ("absolute", 2e-4)
    a = build_parser().parse_args(["convert", "x", "-o", "x.gguf", "--e2e-scale-step", "absolute", "--e2e-lr-scale", "1e-3"])
    assert convert_config_from_args(a).e2e.lr_scale == 1e-3
    a = build_parser().parse_args(["convert", "x", "-o", "x.gguf", "--e2e-lr-scale", "1e-4", "--e2e-lr-zero", "1e-3",
                                   "--e2e-lr-norm", "0"])
    e2e = convert_config_from_args(a).e2e
    assert (e2e.lr_scale, e2e.lr_zero, e2e.lr_norm) == (1e-4, 1e-3, 0.0)


# --- refusals through main(): non-zero exit, one clear line, no output file -----------------------------

def _refused(capsys, argv, needles, code=None):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0, err
    if code is not None:
        assert rc == code
    for n in needles:
        assert n in err, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def llama_dir():
    return tiny_models.checkpoint("llama")


@pytest.mark.parametrize("spec,needle", [("w5s50", "3-bit (gqsa3) codes"), ("w4s100", "0..99"), ("w4sx", "wNsM")])
def test_bad_spec_exits_2(tmp_path, capsys, llama_dir, spec, needle):
    out = tmp_path / "o.gguf"
    _refused(capsys, ["convert", str(llama_dir), "--gqsa", spec, "-o", str(out)], [needle, spec], code=2)
    assert not out.exists()


def test_too_short_e2e_windows_exit_2(tmp_path, capsys, llama_dir):
    out = tmp_path / "o.gguf"
    _refused(capsys, ["convert", str(llama_dir), "--e2e-seqlen", "4", "-o", str(out)], ["--e2e-seqlen 4", "8 tokens"],
             code=2)
    assert not out.exists()


@pytest.mark.parametrize("share", ["1.5", "-0.1"])
def test_lr_decay_outside_the_steps_exits_2(tmp_path, capsys, llama_dir, share):
    out = tmp_path / "o.gguf"
    _refused(capsys, ["convert", str(llama_dir), "--e2e-lr-decay", share, "-o", str(out)],
             [f"--e2e-lr-decay {float(share)}", "[0, 1]"], code=2)
    assert not out.exists()


@pytest.mark.parametrize("flag,rate", [("--e2e-lr-scale", "-0.001"), ("--e2e-lr-zero", "nan"), ("--e2e-lr-norm", "inf")])
def test_learning_rate_not_finite_or_negative_exits_2(tmp_path, capsys, llama_dir, flag, rate):
    out = tmp_path / "o.gguf"
    _refused(capsys, ["convert", str(llama_dir), flag, rate, "-o", str(out)],
             [f"{flag} {float(rate)!r}", "finite learning rate"], code=2)
    assert not out.exists()


def test_unsupported_architecture(tmp_path, capsys):
    folder = tiny_models.make_checkpoint(tmp_path / "gemma", "llama", arch_override="GemmaForCausalLM")
    out = tmp_path / "o.gguf"
    _refused(capsys, ["convert", str(folder), "-o", str(out)],           # with the list of the known ones
             ["GemmaForCausalLM", "not supported", "LlamaForCausalLM", "Qwen2ForCausalLM", *arch.known_hf()])
    assert not out.exists()


def test_missing_folder(tmp_path, capsys):
    out = tmp_path / "o.gguf"
    _refused(capsys, ["convert", str(tmp_path / "nope"), "-o", str(out)], ["does not exist", "nope"])
    assert not out.exists()


def test_width_not_divisible_by_16(tmp_path, capsys):
    folder = tiny_models.make_checkpoint(tmp_path / "odd", "llama", ffn=120)
    out = tmp_path / "o.gguf"
    _refused(capsys, ["convert", str(folder), "-o", str(out), "--calib", str(tiny_models.calib_file(folder))],
             ["mlp.down_proj", "120", "not divisible by the GQSA group size 16"])
    assert not out.exists()


def test_pickled_weights_are_refused(tmp_path, capsys, llama_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((llama_dir / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    _refused(capsys, ["convert", str(folder), "-o", str(tmp_path / "o.gguf")], ["no *.safetensors", "pytorch_model.bin"])


def test_empty_calibration_text(tmp_path, capsys, llama_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    out = tmp_path / "o.gguf"
    _refused(capsys, ["convert", str(llama_dir), "-o", str(out), "--calib", str(empty)], ["empty", "empty.txt"])
    assert not out.exists()


def test_calibration_text_shorter_than_a_window(tmp_path, capsys, llama_dir):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    _refused(capsys, ["convert", str(llama_dir), "-o", str(tmp_path / "o.gguf"), "--calib", str(short),
                      "--seqlen", "64"], ["fewer than one window", "--seqlen 64"])


def test_missing_calibration_file(tmp_path, capsys, llama_dir):
    _refused(capsys, ["convert", str(llama_dir), "-o", str(tmp_path / "o.gguf"), "--calib", "./no/such.txt"],
             ["does not exist"])


def test_group_size_refused(tmp_path, capsys, llama_dir):
    out = tmp_path / "o.gguf"
    _refused(capsys, ["convert", str(llama_dir), "-o", str(out), "--group-size", "32"], ["group size of 16"], code=2)
    _refused(capsys, ["convert", str(llama_dir), "-o", str(out), "--bqpo-epochs", "-1"], ["--bqpo-epochs"], code=2)
    assert not out.exists()


def test_output_folder_must_exist(tmp_path, capsys, llama_dir):
    _refused(capsys, ["convert", str(llama_dir), "-o", str(tmp_path / "no" / "dir" / "o.gguf")], ["does not exist"],
             code=2)


def test_bad_choice_is_an_argparse_error(capsys, llama_dir):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(llama_dir), "-o", "x.gguf", "--dense-type", "q4_0"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_convert_py_is_the_convert_subcommand(tmp_path):
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(REPO / "convert.py"), str(tmp_path), "--gqsa", "w5s50", "-o",
                        str(tmp_path / "o.gguf")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "gqsa-gguf convert: error" in r.stderr and "3-bit (gqsa3) codes" in r.stderr
    r = subprocess.run([sys.executable, str(REPO / "convert.py"), "--help"], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0 and "--nsamples" in r.stdout and "2048" in r.stdout


def test_every_error_class_derives_from_the_one_base():
    import importlib
    import inspect
    import pkgutil

    import gqsa_gguf
    from gqsa_gguf.errors import GQSAError

    found = {}
    for m in pkgutil.walk_packages(gqsa_gguf.__path__, "gqsa_gguf."):
        mod = importlib.import_module(m.name)
        for name, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == mod.__name__
                    and not name.startswith("_")):
                found[f"{m.name}.{name}"] = obj
    assert len(found) >= 18, sorted(found)
    assert [n for n, cls in found.items() if not issubclass(cls, GQSAError)] == []


def test_cli_reports_any_gqsa_error_as_a_message(monkeypatch, capsys):
    from gqsa_gguf import cli
    from gqsa_gguf.allocation import AllocationError

    def fail(a):
        raise AllocationError("budget 3.0 bits per weight cannot be met — raise it")

    monkeypatch.setattr(cli, "_run_bench", fail)
    assert cli.main(["bench"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "gqsa-gguf bench: error: budget 3.0 bits per weight cannot be met — raise it"
