"""convert with BQPO + E2E-OQP on a tiny Qwen2 checkpoint (q/k/v biases): the training stages run
inside the pipeline, write checkpoints, resume, and produce a valid GGUF."""

import math

import pytest
import torch

from gqsa_gguf.config import BQPOConfig, CalibConfig, CompressionConfig, ConvertConfig, ConfigError, E2EConfig
from gqsa_gguf.pipeline import convert

from tiny_models import make_checkpoint, text


def _cfg(tmp_path, folder, out, **kw):
    calib = tmp_path / "calib.txt"
    calib.write_text(text() * 20)
    return ConvertConfig(model=str(folder), output=str(out),
                         compression=CompressionConfig.from_spec("w4s50", **kw),
                         calib=CalibConfig(source=str(calib), nsamples=4, seqlen=32),
                         bqpo=BQPOConfig(epochs=1), e2e=E2EConfig(epochs=1, loss="kd"))


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


def test_gguf_records_the_training_configs_used(tmp_path, monkeypatch):
    """gqsa.config holds every setting of the run, the learning rates included, and they are the
    ones the training stages really ran with."""
    import dataclasses

    from gqsa_gguf import bqpo, e2e
    from gqsa_gguf.config import RUN_ONLY
    from gqsa_gguf.gguf_io import read_gguf

    used = {}

    def spy(stage, fn):
        def run(*args, **kw):
            used[stage] = args[8] if stage == "bqpo" else args[2]          # the config argument
            return fn(*args, **kw)
        return run
    # the streamed BQPO runs bqpo.train_block per block (the loop run_bqpo runs on a loaded model)
    monkeypatch.setattr(bqpo, "train_block", spy("bqpo", bqpo.train_block))
    monkeypatch.setattr(e2e, "run_e2e", spy("e2e", e2e.run_e2e))

    folder = make_checkpoint(tmp_path / "ckpt", "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(text() * 20)
    out = tmp_path / "m.gguf"
    cfg = ConvertConfig(model=str(folder), output=str(out),
                        compression=CompressionConfig.from_spec("w4s40", method="rtn", allocation="uniform", damp=0.02),
                        calib=CalibConfig(source=str(calib), nsamples=4, seqlen=32, seed=3),
                        bqpo=BQPOConfig(epochs=1, lr_weight=3e-5, lr_scale=7e-4, lr_zero=5e-3, seed=3,
                                        target="float-chain"),
                        e2e=E2EConfig(epochs=1, lr_scale=1e-4, lr_zero=1e-3, lr_norm=5e-5, seed=3, loss="kd"))
    convert(cfg, progress=False, log=lambda *a: None, checkpoint_dir=str(tmp_path / "train"))

    recorded = read_gguf(out).gqsa_config
    # E2E-OQP's layer checkpointing "auto" is recorded as what it resolved to for this tiny model,
    # and its window length 0 (= --seqlen) as the length its windows had
    assert recorded["e2e"]["checkpointing"] == "off" and recorded["e2e"]["seqlen"] == 32
    assert ConvertConfig.from_dict(recorded) == dataclasses.replace(
        cfg, e2e=dataclasses.replace(cfg.e2e, checkpointing="off", seqlen=32))
    assert recorded["compression"].items() >= {"spec": "w4s40", "method": "rtn", "allocation": "uniform",
                                               "damp": 0.02}.items()
    assert recorded["calib"].items() >= {"source": str(calib), "nsamples": 4, "seqlen": 32, "seed": 3}.items()
    assert recorded["bqpo"].items() >= {"epochs": 1, "lr_weight": 3e-5, "lr_scale": 7e-4, "lr_zero": 5e-3,
                                        "target": "float-chain", "seed": 3}.items()
    assert recorded["e2e"].items() >= {"epochs": 1, "lr_scale": 1e-4, "lr_zero": 1e-3, "lr_norm": 5e-5,
                                       "loss": "kd", "seed": 3}.items()
    for stage in ("bqpo", "e2e"):          # what ran = what the file says, but for the run-only fields
        ran = dataclasses.asdict(used[stage])
        for k in RUN_ONLY:
            ran.pop(k)
        assert ran == recorded[stage]


def _convert_spying_e2e(tmp_path, monkeypatch, e2e_cfg, nsamples=2, name="m.gguf", seqlen=32, **convert_kw):
    """Converts the tiny LLaMA with `e2e_cfg` (one-shot: round-to-nearest, uniform); returns
    (what run_e2e received: windows, config and step losses; the file's gqsa.config)."""
    from gqsa_gguf import e2e
    from gqsa_gguf.gguf_io import read_gguf

    seen = {}
    real = e2e.run_e2e

    def spy(model, windows, cfg, **kw):
        seen.update(windows=windows.clone(), cfg=cfg)
        rep = real(model, windows, cfg, **kw)
        seen["loss"] = rep.step_loss
        return rep
    monkeypatch.setattr(e2e, "run_e2e", spy)
    folder = tmp_path / "ckpt"
    if not folder.exists():
        make_checkpoint(folder, "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(text() * 20)
    out = tmp_path / name
    cfg = ConvertConfig(model=str(folder), output=str(out),
                        compression=CompressionConfig.from_spec("w4s50", method="rtn", allocation="uniform"),
                        calib=CalibConfig(source=str(calib), nsamples=nsamples, seqlen=seqlen), e2e=e2e_cfg)
    convert(cfg, progress=False, log=lambda *a: None, **convert_kw)
    return seen, read_gguf(out).gqsa_config


def test_e2e_windows_drawn_apart_from_the_oneshot_windows(tmp_path, monkeypatch):
    """--e2e-windows N: E2E-OQP trains on N windows of the calibration text while the one-shot
    pass keeps its --nsamples; the file records the setting."""
    seen, recorded = _convert_spying_e2e(tmp_path, monkeypatch, E2EConfig(epochs=1, windows=6, loss="kd"))
    assert tuple(seen["windows"].shape) == (6, 32)
    assert recorded["e2e"]["windows"] == 6


def test_e2e_windows_of_their_own_length(tmp_path, monkeypatch):
    """--e2e-seqlen L: E2E-OQP's windows hold L tokens each whatever --seqlen the one-shot pass
    calibrates on (with --e2e-windows 0, --nsamples of them, not the one-shot's own); the file
    records the length that was used; lengths under 8 are refused like --seqlen's."""
    seen, recorded = _convert_spying_e2e(tmp_path, monkeypatch, E2EConfig(epochs=1, windows=6, seqlen=16, loss="kd"))
    assert tuple(seen["windows"].shape) == (6, 16)
    assert recorded["e2e"]["seqlen"] == 16 and recorded["calib"]["seqlen"] == 32
    seen, recorded = _convert_spying_e2e(tmp_path, monkeypatch, E2EConfig(epochs=1, windows=0, seqlen=8, loss="kd"),
                                         nsamples=3, name="m0.gguf")
    assert tuple(seen["windows"].shape) == (3, 8)
    # 0: the calibration windows' length, recorded as the length used
    seen, recorded = _convert_spying_e2e(tmp_path, monkeypatch, E2EConfig(epochs=1, windows=0, loss="kd"),
                                         name="m1.gguf")
    assert tuple(seen["windows"].shape) == (2, 32) and recorded["e2e"]["seqlen"] == 32
    with pytest.raises(ConfigError, match="e2e-seqlen"):
        E2EConfig(seqlen=4)


def test_amp_auto_reads_the_cpu_flags():
    from gqsa_gguf.training import TrainingError, check_amp, cpu_has_native_bf16, resolve_amp

    amx = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
    zen4 = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"
    avx2 = "flags\t\t: fpu sse4_2 avx avx2 fma\n"
    neoverse_v1 = "Features\t: fp asimd sve bf16 i8mm\n"
    cortex_a72 = "Features\t: fp asimd evtstrm crc32\n"
    assert [cpu_has_native_bf16(s) for s in (amx, zen4, avx2, neoverse_v1, cortex_a72)] == \
        [True, True, False, True, False]
    assert resolve_amp("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "none")
    assert resolve_amp("none", "cpu") == "none" and resolve_amp("bf16", "cpu") == "bf16"
    check_amp("bf16", torch.device("cpu"))                       # bf16 autocast runs on the CPU
    with pytest.raises(TrainingError, match="fp16"):
        check_amp("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="amp"):
        E2EConfig(amp="fp8")


def test_amp_auto_is_recorded_as_what_ran(tmp_path, monkeypatch):
    """The converter's default --amp auto: the file says which precision E2E-OQP really used, and a
    bf16 run on the CPU trains (a finite loss at every step)."""
    from gqsa_gguf.training import resolve_amp

    for amp in ("auto", "bf16"):
        seen, recorded = _convert_spying_e2e(tmp_path, monkeypatch, E2EConfig(epochs=1, loss="kd", amp=amp),
                                             nsamples=4, name=f"m-{amp}.gguf")
        want = resolve_amp(amp, "cpu")
        assert seen["cfg"].amp == want and recorded["e2e"]["amp"] == want
        assert all(math.isfinite(v) for v in seen["loss"]) and len(seen["loss"]) == 2


def test_chat_windows_are_conversations_of_the_calibration_text(tmp_path):
    from transformers import AutoTokenizer

    from gqsa_gguf import calib

    folder = make_checkpoint(tmp_path / "ckpt", "llama")
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = calib.tokenize(tok, text() * 20)
    w = calib.chat_windows(tok, ids, 3, 64, seed=5, turn=(8, 16))
    assert tuple(w.shape) == (3, 64)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    for row in w.tolist():
        assert row[0] == start and end in row                  # the template's markers, from token 0
        decoded = tok.decode(row)
        assert "user\n" in decoded and "assistant\n" in decoded
    assert torch.equal(w, calib.chat_windows(tok, ids, 3, 64, seed=5, turn=(8, 16)))      # reproducible
    assert not torch.equal(w, calib.chat_windows(tok, ids, 3, 64, seed=6, turn=(8, 16)))
    tok.chat_template = None
    with pytest.raises(calib.CalibError, match="chat template"):
        calib.chat_windows(tok, ids, 1, 64, seed=0)


def test_e2e_trains_on_a_share_of_chat_windows(tmp_path, monkeypatch):
    """--e2e-chat-share: that share of E2E-OQP's windows are chat-formatted; the file records it."""
    from transformers import AutoTokenizer

    seen, recorded = _convert_spying_e2e(tmp_path, monkeypatch,
                                         E2EConfig(epochs=1, windows=8, loss="kd", chat_share=0.25))
    start = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt")).convert_tokens_to_ids("<|im_start|>")
    assert [int(r[0] == start) for r in seen["windows"]] == [0] * 6 + [1] * 2
    assert recorded["e2e"]["chat_share"] == 0.25
    with pytest.raises(ConfigError, match="chat-share"):
        E2EConfig(chat_share=1.5)


def test_chat_windows_take_the_first_answer_from_reply(tmp_path):
    """chat_windows(reply=...): `reply` answers the first user turn of every window, given the
    conversation so far (one user turn); the rest of each window is turns of the text."""
    from transformers import AutoTokenizer

    from gqsa_gguf import calib

    folder = make_checkpoint(tmp_path / "ckpt", "llama")
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = calib.tokenize(tok, text() * 20)
    calls = []

    def reply(conversations):
        assert all(len(c) == 1 and c[0]["role"] == "user" for c in conversations)
        calls.append(len(conversations))
        return [f"answer number {i}" for i in range(len(conversations))]

    w = calib.chat_windows(tok, ids, 3, 96, seed=5, turn=(8, 16), reply=reply)
    assert tuple(w.shape) == (3, 96) and calls == [3]
    for i, row in enumerate(w.tolist()):
        decoded = tok.decode(row)
        assert f"assistant\nanswer number {i}" in decoded
        assert decoded.count("assistant\n") >= 2                 # text turns fill the rest of the window
    with pytest.raises(calib.CalibError, match="answers"):
        calib.chat_windows(tok, ids, 2, 64, seed=5, turn=(8, 16), reply=lambda conversations: ["only one"])


def test_chat_windows_take_the_first_question_from_ask(tmp_path):
    """chat_windows(reply=..., ask=...): `ask` writes the first user turn of every window and
    `reply` answers it; the template's text around a user message is what the model writes a
    question under (calib.user_turn_prefix)."""
    from transformers import AutoTokenizer

    from gqsa_gguf import calib

    folder = make_checkpoint(tmp_path / "ckpt", "llama")
    tok = AutoTokenizer.from_pretrained(str(folder))
    before, after = calib.user_turn_prefix(tok)
    assert before.startswith("<|im_start|>") and before.endswith("<|im_start|>user\n")
    assert after.startswith("<|im_end|>")
    ids = calib.tokenize(tok, text() * 20)
    asked = []

    def ask(n):
        asked.append(n)
        return [f"question number {i}?" for i in range(n)]

    def reply(conversations):
        return [f"answer to {c[0]['content']}" for c in conversations]

    w = calib.chat_windows(tok, ids, 3, 96, seed=5, turn=(8, 16), reply=reply, ask=ask)
    assert asked == [3]
    for i, row in enumerate(w.tolist()):
        decoded = tok.decode(row)
        assert f"user\nquestion number {i}?<|im_end|>" in decoded
        assert f"assistant\nanswer to question number {i}?" in decoded
    with pytest.raises(calib.CalibError, match="questions"):
        calib.chat_windows(tok, ids, 2, 64, seed=5, reply=reply, ask=lambda n: ["only one"])
    with pytest.raises(calib.CalibError, match="need its answers"):
        calib.chat_windows(tok, ids, 2, 64, seed=5, ask=ask)


def test_e2e_chat_windows_written_by_the_float_model_itself(tmp_path, monkeypatch):
    """The converter's --e2e-chat-replies auto on a small model: "self" (recorded so), the float
    model writes the questions (sampled from its chat template up to a user message, stopped at
    the end of the turn) and answers them; the windows are kept for --resume, which writes nothing
    again."""
    from transformers import AutoTokenizer

    from gqsa_gguf import calib

    said = {"q": [], "a": []}
    real_q, real_a = calib.model_questions, calib.model_replies

    def short(real, key, n):
        def make(model, tokenizer, seed, **kw):
            inner = real(model, tokenizer, seed, max_new_tokens=n, **kw)

            def call(arg):
                said[key].append(inner(arg))
                return said[key][-1]
            return call
        return make
    monkeypatch.setattr(calib, "model_questions", short(real_q, "q", 8))
    monkeypatch.setattr(calib, "model_replies", short(real_a, "a", 6))
    ck = tmp_path / "ck"
    e2e_cfg = E2EConfig(epochs=1, windows=8, loss="kd", chat_share=0.25, chat_replies="auto")
    seen, recorded = _convert_spying_e2e(tmp_path, monkeypatch, e2e_cfg, seqlen=256, checkpoint_dir=str(ck))
    assert recorded["e2e"]["chat_replies"] == "self" and (ck / "chat.ckpt").is_file()
    assert len(said["q"]) == 1 and len(said["q"][0]) == 2 and len(said["a"]) == 1
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    for q, a, row in zip(said["q"][0], said["a"][0], seen["windows"][6:]):
        decoded = tok.decode(row.tolist())
        assert decoded.index(q.strip()) < decoded.index("assistant\n" + a.strip())
    windows = seen["windows"]
    said["q"].clear()
    said["a"].clear()
    seen, _ = _convert_spying_e2e(tmp_path, monkeypatch, e2e_cfg, name="again.gguf", seqlen=256,
                                  checkpoint_dir=str(ck), resume=True)
    assert said == {"q": [], "a": []} and torch.equal(seen["windows"], windows)


def test_e2e_chat_replies_written_by_the_float_model(tmp_path, monkeypatch):
    """--e2e-chat-replies model: the float model answers the chat windows' user turns, the answers
    are in E2E-OQP's windows, kept in the checkpoint folder, and --resume reads them back."""
    from transformers import AutoTokenizer

    from gqsa_gguf import calib

    answers = []
    real = calib.model_replies

    def short_replies(model, tokenizer, seed, **kw):
        inner = real(model, tokenizer, seed, max_new_tokens=6, **kw)

        def reply(conversations):
            answers.append(inner(conversations))
            return answers[-1]
        return reply
    monkeypatch.setattr(calib, "model_replies", short_replies)
    ck = tmp_path / "ck"
    e2e_cfg = E2EConfig(epochs=1, windows=8, loss="kd", chat_share=0.25, chat_replies="model")
    seen, recorded = _convert_spying_e2e(tmp_path, monkeypatch, e2e_cfg, seqlen=256, checkpoint_dir=str(ck))
    assert recorded["e2e"]["chat_replies"] == "model" and (ck / "chat.ckpt").is_file()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert [int(r[0] == start) for r in seen["windows"]] == [0] * 6 + [1] * 2
    said = [a.strip() for a in answers[0]]                   # round 1: one answer per chat window
    assert len(said) == 2 and all(said)
    assert said[0] in tok.decode(seen["windows"][6].tolist()) and said[1] in tok.decode(seen["windows"][7].tolist())
    windows = seen["windows"]
    answers.clear()
    seen, _ = _convert_spying_e2e(tmp_path, monkeypatch, e2e_cfg, name="again.gguf", seqlen=256,
                                  checkpoint_dir=str(ck), resume=True)
    assert answers == [] and torch.equal(seen["windows"], windows)
    with pytest.raises(ConfigError, match="chat-replies"):
        E2EConfig(chat_replies="teacher")
