"""memory: the per-stage estimate counts what the model holds, grows with the settings as it should,
reproduces the measured peaks, and the CLI refuses a conversion that cannot fit (and converts with
--ignore-memory-check)."""

from dataclasses import replace
from pathlib import Path

import pytest

import tiny_models
from gqsa_gguf import arch, memory, model_io
from gqsa_gguf.memory import GB, MemorySettings, estimate, model_sizes

pytestmark = pytest.mark.fast


def shape(h, layers, ffn, heads, kv, vocab, tie, context=8192):
    return model_io.ModelInfo(
        folder=Path("/nonexistent"), architecture="LlamaForCausalLM", layout=arch.for_hf("LlamaForCausalLM"),
        n_layers=layers, hidden_size=h, intermediate_size=ffn, n_head=heads, n_head_kv=kv, head_dim=h // heads,
        context_length=context, vocab_size=vocab, rope_type="default", tie_embeddings=tie)


SMOL = shape(576, 30, 1536, 9, 3, 49152, True)                 # SmolLM2-135M
ONE_B = shape(2048, 22, 5632, 32, 4, 151936, True)             # the 1.3B of issue 16
SEVEN_B = shape(4096, 32, 11008, 32, 32, 49152, False)         # scripts/make_random_checkpoint.py llama-7b
TINY = shape(64, 2, 128, 4, 2, 49152, True, context=2048)      # scripts/make_random_checkpoint.py tiny


def peak(info, s, pipeline="whole-model", stage=None):
    e = estimate(info, s, pipeline, checkpoint_bytes=2 * model_sizes(info).total)
    return (e.stage(stage) if stage else e.peak).total


@pytest.mark.parametrize("kind,kw", [("llama", {}), ("llama", {"tie": False}), ("qwen2", {}),
                                     ("Qwen3ForCausalLM", {"config": {"head_dim": 32}})])
def test_sizes_count_every_parameter(kind, kw):
    info = model_io.inspect_checkpoint(tiny_models.checkpoint(kind, **kw))
    model = model_io.load_model(info)
    z = model_sizes(info)
    assert z.total == sum(p.numel() for p in model.parameters())
    assert z.linear == sum(model.get_submodule(n).weight.numel() for n in info.layout.linear_names(info.n_layers))


def test_smollm2_size():
    assert model_sizes(SMOL).total == 134_515_008          # SmolLM2-135M-Instruct's parameter count


def test_estimate_grows_with_the_settings():
    s = MemorySettings(nsamples=32, seqlen=256, bqpo_epochs=1, e2e_epochs=1)
    for pipeline in memory.PIPELINES:
        for stage in ("one-shot", "bqpo", "e2e"):
            base = peak(ONE_B, s, pipeline, stage)
            assert peak(ONE_B, replace(s, nsamples=128), pipeline, stage) > base, (pipeline, stage)
            assert peak(ONE_B, replace(s, seqlen=1024), pipeline, stage) > base, (pipeline, stage)
        assert peak(ONE_B, replace(s, batch_size=32), pipeline, "one-shot") > peak(ONE_B, s, pipeline, "one-shot")
        names = {st.name for st in estimate(ONE_B, replace(s, bqpo_epochs=0, e2e_epochs=0), pipeline).stages}
        assert "bqpo" not in names and "e2e" not in names
        assert peak(ONE_B, replace(s, bqpo_epochs=0, e2e_epochs=0), pipeline) <= peak(ONE_B, s, pipeline)
    # training keeps a float copy of the whole model today
    assert (peak(ONE_B, replace(s, e2e_epochs=0, bqpo_epochs=0), stage="one-shot")
            < peak(ONE_B, s, stage="one-shot") - 4 * model_sizes(ONE_B).total)
    # on a GPU the training stages are not host memory
    assert {st.name for st in estimate(ONE_B, replace(s, train_on_host=False)).stages} == {"load", "one-shot", "export"}


def test_streamed_is_near_flat_in_depth():
    """Whole-model grows by about 3 float32 models per added depth; streamed by the compressed
    blocks only (issue 16: the 1B- and 7B-shape peaks differ by less than a block + activations)."""
    s = MemorySettings(nsamples=8, seqlen=256, bqpo_epochs=1, e2e_epochs=1)
    deep = replace(SEVEN_B, n_layers=64)
    whole = peak(deep, s) - peak(SEVEN_B, s)
    streamed = peak(deep, s, "streamed") - peak(SEVEN_B, s, "streamed")
    assert whole > 3 * 32 * model_sizes(SEVEN_B).block * 4
    assert streamed < whole / 5
    for info in (ONE_B, SEVEN_B):
        assert peak(info, s, "streamed") < peak(info, s) / 4


def test_reproduces_the_measured_peaks():
    """Peak RSS measured with /usr/bin/time -v (docs/DESIGN.md, "Memory: what each stage holds"): the
    estimate is at most 30 % high and not low by more than 5 %."""
    tiny = MemorySettings(nsamples=4, seqlen=512, allocation="uniform", e2e_epochs=0)
    measured = [
        (SMOL, MemorySettings(), None, 4.4e9),                                           # the defaults
        (TINY, tiny, None, 0.49e9),                      # the runtime, nearly alone
        (TINY, replace(tiny, e2e_epochs=1), None, 1.15e9),  # + E2E-OQP's logits (49152 x 512)
        (ONE_B, MemorySettings(nsamples=8, seqlen=256, bqpo_epochs=1, e2e_epochs=1), "one-shot", 17.5e9),
    ]
    for info, s, stage, m in measured:
        est = peak(info, s, stage=stage)
        assert 0.95 * m <= est <= 1.3 * m, (info.hidden_size, stage, est / GB, m / GB)
    # the 1.3B run was killed at 23.2 GB at the start of E2E-OQP: it needed more
    assert peak(ONE_B, MemorySettings(nsamples=8, seqlen=256, bqpo_epochs=1, e2e_epochs=1), stage="e2e") > 23.2e9


ONE_B_2 = shape(2048, 2, 5632, 32, 4, 49152, False, context=2048)   # make_random_checkpoint.py --preset llama-1b --layers 2


def test_reproduces_the_measured_streamed_training_peaks():
    """The streamed training's peak RSS measured with /usr/bin/time -v (docs/DESIGN.md), all with
    --e2e-windows 0, uniform allocation, bf16 autocast: the 1B shape with 2 layers at 8 x 256, BQPO
    and E2E-OQP each alone (resumed from the same one-shot) and both after the one-shot; SmolLM2."""
    # measured before AdamW was stepped from the gradient hooks: every gradient held
    s = MemorySettings(nsamples=8, seqlen=256, bqpo_epochs=1, e2e_epochs=1, allocation="uniform",
                       e2e_step_in_backward=False, e2e_checkpointing="on")
    measured = [
        (ONE_B_2, replace(s, e2e_epochs=0), "bqpo", 2.43e9),
        (ONE_B_2, replace(s, bqpo_epochs=0), "e2e", 2.10e9),
        (ONE_B_2, s, None, 2.61e9),
        (replace(ONE_B_2, n_layers=6), s, None, 2.93e9),              # the same with 6 layers
        # SmolLM2-135M: BQPO + E2E-OQP at 8 x 128, E2E-OQP alone at 32 x 256
        (SMOL, replace(s, seqlen=128), None, 1.12e9),
        (SMOL, replace(s, nsamples=32, bqpo_epochs=0), "e2e", 1.30e9),
    ]
    # the 7B width with 2 and 4 layers, E2E-OQP alone: before (every gradient held), and one backward
    # a step (2 windows) with AdamW stepped in the backward, or after it
    e2e = replace(s, bqpo_epochs=0)
    now = replace(e2e, e2e_step_in_backward=True, e2e_micro_batch=2)
    measured += [
        (replace(SEVEN_B, n_layers=2), e2e, "e2e", 3.91e9),
        (replace(SEVEN_B, n_layers=4), e2e, "e2e", 4.51e9),
        (replace(SEVEN_B, n_layers=2), now, "e2e", 4.08e9),
        (replace(SEVEN_B, n_layers=4), now, "e2e", 4.70e9),
        (replace(SEVEN_B, n_layers=4), replace(now, e2e_step_in_backward=False), "e2e", 4.66e9),
        (replace(SEVEN_B, n_layers=4), replace(now, e2e_moments="bf16"), "e2e", 4.34e9),
    ]
    for info, settings, stage, m in measured:
        est = peak(info, settings, "streamed", stage)
        assert 0.95 * m <= est <= 1.3 * m, (info.hidden_size, info.n_layers, stage, est / GB, m / GB)


def test_the_probe_holds_its_hessians_and_no_k_by_k_matrix_beside_them():
    """The sensitivity probe (oneshot.sensitivity_block) widens, factors and inverts each input
    group's Hessian in slabs or in its own memory: its working set is the block's four float64
    Hessians with the widest input's float32 X^T X (the dense pass), never a Hessian with a float64
    copy, factor or inverse beside it (24 K^2 bytes more for the widest before issue 16's fix)."""
    assert memory.PROBE_GROUPS == tuple(len(group) for _, group in arch.INPUT_GROUPS)
    assert arch.for_hf("LlamaForCausalLM").linears == arch.LINEARS       # model_sizes' shapes, in group order
    z = model_sizes(SEVEN_B)
    hessians = 8 * (3 * 4096 ** 2 + 11008 ** 2)
    probe = memory._probe_working_set(z)
    assert probe == hessians + 4 * 11008 ** 2 + memory.SLAB_BYTES                # the dense pass sets it
    assert probe < hessians + 8 * 11008 ** 2                                     # no K x K float64 beside
    # the groups' rounding, beside the Hessians still to come: gate/up (11008 x 4096) with down_proj's
    assert probe > 8 * 11008 ** 2 + 16 * 11008 * 4096
    st = estimate(SEVEN_B, MemorySettings(nsamples=8, seqlen=256, bqpo_epochs=1, e2e_epochs=0),
                  "streamed").stage("sensitivity")
    assert st.terms["probe working set"] == probe
    assert st.total < 5.5e9                                                      # issue 16's 7B probe
    # measured (VmHWM): oneshot.sensitivity_blocks on the first 2 blocks of the llama-7b random
    # checkpoint, 8 x 256 windows, streamed: 3.58 GB (5.80 GB before the fix, estimated 5.51 then)
    assert 3.58e9 <= st.total <= 1.3 * 3.58e9


def test_refusal_names_the_stage_and_what_fits():
    s = MemorySettings(nsamples=8, seqlen=256, bqpo_epochs=1, e2e_epochs=1)
    # the streamed training fits the 1.3B of issue 16 in 24 GB (the whole-model one was killed at 23.2)
    assert memory.check(ONE_B, s, available=int(24e9), checkpoint_bytes=int(2.6e9)).fits
    v = memory.check(ONE_B, s, available=int(4e9), checkpoint_bytes=int(2.6e9))
    assert not v.fits
    assert "e2e stage" in v.message and "4.0 GB of memory is available" in v.message
    assert "--e2e-epochs 0" in v.message and "--ignore-memory-check" in v.message
    assert "(streamed pipeline" in v.message
    for change, e in v.alternatives:
        assert e.peak.total <= 4e9 * memory.HEADROOM
    # the float model writing the chat windows' turns: it is loaded whole for that, and the message says so
    v = memory.check(ONE_B, replace(s, chat_share=0.5, chat_replies="self"), available=int(12e9),
                     checkpoint_bytes=int(2.6e9))
    assert not v.fits and "chat stage" in v.message and "whole float32 model" in v.message
    assert "--e2e-chat-replies text" in v.message
    assert memory.check(ONE_B, s, available=int(1e12)).fits
    # a 7B shape: training fits in 24 GB streamed; in 12 GB only without E2E-OQP
    assert memory.check(SEVEN_B, s, available=int(24e9)).fits
    v = memory.check(SEVEN_B, s, available=int(12e9))
    assert not v.fits and "e2e stage" in v.message and "--e2e-epochs 0 (~" in v.message
    assert memory.check(SEVEN_B, replace(s, bqpo_epochs=0, e2e_epochs=0), available=int(24e9)).fits
    # the whole-model pipeline: nothing fits, and the message gives the streamed converter's need
    v = memory.check(SEVEN_B, s, available=int(24e9), pipeline="whole-model")
    assert not v.fits and "No smaller" in v.message and "layer-streamed converter would need" in v.message


def test_the_converter_pipeline():
    """Streamed throughout, training included; where the float model writes E2E-OQP's chat turns
    it is a stage of its own, before the teacher pass (the rest of the estimate unchanged)."""
    s = MemorySettings(nsamples=8, seqlen=256, bqpo_epochs=1, e2e_epochs=1)
    assert memory.converter_pipeline(s) == "streamed"
    assert [st.name for st in estimate(ONE_B, s, "streamed").stages] == \
        ["embed", "sensitivity", "one-shot", "bqpo", "teacher", "e2e", "export"]
    writes = replace(s, chat_share=0.5, chat_replies="self")
    assert memory.converter_pipeline(writes) == "streamed"
    assert [st.name for st in estimate(ONE_B, writes, "streamed").stages] == \
        ["embed", "sensitivity", "one-shot", "bqpo", "chat", "teacher", "e2e", "export"]
    for stage in ("bqpo", "teacher", "e2e", "export"):
        assert peak(ONE_B, writes, "streamed", stage) == peak(ONE_B, s, "streamed", stage)
    chat = {st.name: st for st in estimate(ONE_B, writes, "streamed").stages}["chat"]
    assert chat.terms["model f32"] == 4 * model_sizes(ONE_B).total
    for quiet in (replace(writes, chat_replies="text"), replace(writes, chat_share=0.0),
                  replace(writes, e2e_epochs=0, bqpo_epochs=0)):
        assert "chat" not in [st.name for st in estimate(ONE_B, quiet, "streamed").stages]
    assert [st.name for st in estimate(ONE_B, s, "streamed-oneshot").stages] == \
        ["embed", "sensitivity", "one-shot", "load", "bqpo", "e2e", "export"]
    for stage in ("bqpo", "e2e"):
        assert peak(ONE_B, s, "streamed-oneshot", stage) == peak(ONE_B, s, "whole-model", stage)
    names = [st.name for st in estimate(ONE_B, replace(s, allocation="uniform", bqpo_epochs=0, e2e_epochs=0),
                                        "streamed").stages]
    assert names == ["embed", "one-shot", "export"]
    # without training the 7B shape is within issue 16's 6 GB, and near-flat in depth: doubling
    # the depth adds only the export's gqsa4 rows
    s0 = replace(s, bqpo_epochs=0, e2e_epochs=0)
    assert peak(SEVEN_B, s0, "streamed") <= 6e9
    deep = replace(SEVEN_B, n_layers=64)
    assert peak(deep, s0, "streamed") - peak(SEVEN_B, s0, "streamed") < 0.5 * model_sizes(SEVEN_B).linear
    # with E2E-OQP each layer adds its compressed codes and the scales/zeros with their optimizer
    # state (under 2 bytes a parameter, against the whole-model pipeline's 12 and more)
    per_param = (peak(deep, s, "streamed") - peak(SEVEN_B, s, "streamed")) / (32 * model_sizes(SEVEN_B).block)
    assert 1.0 < per_param < 2.0
    assert (peak(deep, s) - peak(SEVEN_B, s)) / (32 * model_sizes(SEVEN_B).block) > 12


def test_available_memory():
    import psutil

    avail = memory.available_memory()
    assert 0 < avail <= psutil.virtual_memory().total


def test_training_defaults_agree():
    from gqsa_gguf.bqpo import BQPOConfig
    from gqsa_gguf.e2e import E2EConfig

    assert BQPOConfig().batch_size == memory.BQPO_BATCH
    assert E2EConfig().micro_batch == memory.E2E_MICRO_BATCH
    assert E2EConfig().batch_size == memory.E2E_BATCH
    assert E2EConfig().step_in_backward == MemorySettings().e2e_step_in_backward
    assert E2EConfig().moments == MemorySettings().e2e_moments


def test_settings_from_config_clip_seqlen():
    import dataclasses

    from gqsa_gguf.config import CONVERT_BQPO, CONVERT_E2E, CalibConfig, CompressionConfig, ConvertConfig

    info = model_io.inspect_checkpoint(tiny_models.checkpoint("llama"))
    cfg = ConvertConfig(model=str(info.folder), output="x.gguf",
                        compression=CompressionConfig.from_spec("w4s75"),
                        calib=CalibConfig(nsamples=16, seqlen=4096, batch_size=4),
                        bqpo=dataclasses.replace(CONVERT_BQPO, epochs=2),
                        e2e=dataclasses.replace(CONVERT_E2E, epochs=0))
    s = MemorySettings.from_config(cfg, info, device="cuda")
    assert (s.nsamples, s.seqlen, s.batch_size, s.bqpo_epochs, s.e2e_epochs, s.sparsity, s.train_on_host) == \
        (16, info.context_length, 4, 2, 0, 0.75, False)
    cfg = dataclasses.replace(cfg, e2e=dataclasses.replace(CONVERT_E2E, batch_size=4, micro_batch=2, moments="bf16",
                                                             step_in_backward=False, checkpointing="off"))
    s = MemorySettings.from_config(cfg, info)
    assert (s.e2e_batch, s.e2e_micro_batch, s.e2e_moments, s.e2e_step_in_backward, s.e2e_checkpointing) == \
        (4, 2, "bf16", False, "off")
    # the converter's option reaches the config, and a wrong value is refused
    from gqsa_gguf import cli
    from gqsa_gguf.config import ConfigError

    a = cli.build_parser().parse_args(["convert", "-o", "x.gguf", "--e2e-checkpointing", "on"])
    assert cli.convert_config_from_args(a).e2e.checkpointing == "on"
    with pytest.raises(ConfigError, match="e2e-checkpointing"):
        dataclasses.replace(CONVERT_E2E, checkpointing="sometimes")


def test_cli_refuses_up_front_and_the_override_converts(tmp_path, monkeypatch, capsys):
    from gqsa_gguf import cli, pipeline

    folder = tiny_models.checkpoint("llama")
    out = tmp_path / "x.gguf"
    called = []

    def fake_convert(cfg, **kw):
        called.append(cfg)
        raise memory.MemoryCheckError("fake conversion reached")

    monkeypatch.setattr(pipeline, "convert", fake_convert)
    monkeypatch.setattr(memory, "available_memory", lambda: int(0.5e9))
    argv = ["convert", str(folder), "-o", str(out), "--nsamples", "8", "--seqlen", "32"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "gqsa-gguf convert: error: this conversion needs about" in err and "0.5 GB of memory is available" in err
    assert "--ignore-memory-check" in err
    assert not called and not out.exists()

    assert cli.main(argv + ["--ignore-memory-check"]) == 1
    assert "fake conversion reached" in capsys.readouterr().err and len(called) == 1

    monkeypatch.setattr(memory, "available_memory", lambda: int(1e12))
    assert cli.main(argv) == 1 and len(called) == 2
    # a missing checkpoint is left to the conversion's own refusal
    assert cli.main(["convert", str(tmp_path / "nope"), "-o", str(out)]) == 1 and len(called) == 3


def test_the_e2e_optimizer_terms():
    """The streamed E2E-OQP's AdamW terms: two fp32 moments per scale and zero (bf16: half); every
    gradient when one step follows the backward or micro-batches accumulate, one linear's when AdamW
    is stepped from the hooks on a one-backward step; the converter takes the step's windows in one
    backward where that holds less (the 7B shape: 1.6 GB of gradients against 0.35 GB more logits)
    and keeps one window a backward where the logits dominate (SmolLM2 at the defaults)."""
    s = MemorySettings(nsamples=8, seqlen=256, bqpo_epochs=1, e2e_epochs=1, allocation="uniform")
    z = model_sizes(SEVEN_B)
    qparams = int(0.5 * z.linear / 16 * 2 * 4)

    def terms(**kw):
        return estimate(SEVEN_B, replace(s, **kw), "streamed", checkpoint_bytes=1).stage("e2e").terms

    old = terms(e2e_step_in_backward=False)
    assert old["AdamW moments"] == 2 * qparams and old["scale/zero grad"] == qparams == old["scale/zero"]
    assert terms(e2e_micro_batch=1, e2e_batch=4)["scale/zero grad"] == qparams          # accumulated
    assert memory.e2e_micro_batch(SEVEN_B, s) == 2 and memory.e2e_micro_batch(SEVEN_B, replace(
        s, e2e_step_in_backward=False)) == 1
    new = terms()
    widest = max(n * k for n, k in z.linear_shapes)
    assert new["scale/zero grad"] == int(0.5 * widest / 16 * 2 * 4) < qparams / 100
    assert new["logits"] == 2 * old["logits"]                                          # two windows a backward
    assert terms(e2e_moments="bf16")["AdamW moments"] == qparams
    e_old = peak(SEVEN_B, replace(s, e2e_step_in_backward=False), "streamed", "e2e")
    e_new = peak(SEVEN_B, s, "streamed", "e2e")
    e_bf16 = peak(SEVEN_B, replace(s, e2e_moments="bf16"), "streamed", "e2e")
    assert 13.5e9 < e_old < 14e9 and 12.4e9 < e_new < 12.9e9 and 10.6e9 < e_bf16 < 11.1e9
    # SmolLM2 at the defaults: its gradients are 17 MB, a second window's logits 0.7 GB
    assert memory.e2e_micro_batch(SMOL, MemorySettings()) == 1
    assert estimate(SMOL, MemorySettings(), "streamed").stage("e2e").terms["scale/zero grad"] == \
        int(0.5 * model_sizes(SMOL).linear / 16 * 2 * 4)


def test_e2e_layer_checkpointing_where_it_saves_more_than_a_gigabyte():
    """'auto' keeps every layer's activations (no recomputed forward) only where that costs at most
    E2E_MEMORY_ALLOWANCE more than checkpointing: SmolLM2-135M at the defaults, not the 1B or
    7B shapes; 'on' and 'off' are what they say, and the stage counts what each holds."""
    s = MemorySettings(e2e_epochs=1)
    assert memory.e2e_checkpointing(SMOL, s) is False
    assert memory.e2e_checkpointing(SEVEN_B, replace(s, nsamples=8, seqlen=256)) is True
    assert memory.e2e_checkpointing(ONE_B, s) is True
    assert memory.e2e_checkpointing(SMOL, replace(s, e2e_checkpointing="on")) is True
    assert memory.e2e_checkpointing(SEVEN_B, replace(s, e2e_checkpointing="off")) is False
    on = peak(SMOL, replace(s, e2e_checkpointing="on"), "streamed", "e2e")
    off = peak(SMOL, replace(s, e2e_checkpointing="off"), "streamed", "e2e")
    assert off == peak(SMOL, s, "streamed", "e2e")
    assert 0 < off - on <= memory.E2E_MEMORY_ALLOWANCE
    terms = memory.estimate(SMOL, s, "streamed", checkpoint_bytes=1).stage("e2e").terms
    assert "checkpointed layer inputs" not in terms
    assert terms["every layer's activations"] == SMOL.n_layers * memory._saved_for_backward(
        memory.model_sizes(SMOL), s.seqlen, s.seqlen)


def test_e2e_moments_in_bf16_where_they_save_more_than_a_gigabyte():
    """The converter's --e2e-moments auto: bf16 moments for the 7B shape (fp32 would hold 3.2 GB of
    moments), fp32 for SmolLM2-135M and the 1B shape; resolved before training, so the file's
    config records what ran, and run_e2e refuses an unresolved "auto"."""
    import dataclasses

    from gqsa_gguf import pipeline
    from gqsa_gguf.config import CONVERT_E2E, ConvertConfig
    from gqsa_gguf.e2e import TrainingError, run_e2e

    s = MemorySettings(e2e_moments="auto", nsamples=8, seqlen=256, bqpo_epochs=1, e2e_epochs=1)
    assert CONVERT_E2E.moments == "auto"
    assert memory.e2e_moments(SEVEN_B, s) == "bf16"
    assert memory.e2e_moments(ONE_B, s) == memory.e2e_moments(SMOL, s) == "fp32"
    assert memory.e2e_moments(SEVEN_B, replace(s, e2e_moments="fp32")) == "fp32"
    auto = memory.estimate(SEVEN_B, s, "streamed", checkpoint_bytes=1).stage("e2e").terms
    bf16 = memory.estimate(SEVEN_B, replace(s, e2e_moments="bf16"), "streamed", checkpoint_bytes=1).stage("e2e").terms
    assert auto == bf16
    info = model_io.inspect_checkpoint(tiny_models.checkpoint("llama"))
    cfg = ConvertConfig(model=str(info.folder), output="x.gguf", e2e=CONVERT_E2E)
    got = pipeline.resolve_memory_choices(cfg, info, log=lambda *a: None)
    assert (got.e2e.moments, got.e2e.checkpointing) == ("fp32", "off")
    with pytest.raises(TrainingError, match="resolved"):
        run_e2e(None, None, dataclasses.replace(CONVERT_E2E, amp="none"), log=lambda *a: None)


def test_chat_turns_written_by_the_float_model_where_that_costs_no_peak_memory():
    """--e2e-chat-replies auto: "self" where loading the float model to write the chat windows does
    not raise the conversion's peak (SmolLM2-135M at the defaults), "text" where it would (the 1B
    and 7B shapes, whose float model alone is several GB more than the streamed conversion holds);
    a given choice is kept."""
    s = MemorySettings(nsamples=128, seqlen=512, e2e_epochs=1, e2e_windows=384, e2e_batch=1,
                       chat_share=0.5, chat_replies="auto")
    assert memory.chat_replies(SMOL, s) == "self"
    for big in (ONE_B, SEVEN_B):
        assert memory.chat_replies(big, s) == "text"
    for given in ("text", "model", "self"):
        assert memory.chat_replies(SEVEN_B, replace(s, chat_replies=given)) == given
    chosen = estimate(SMOL, replace(s, chat_replies="self"), "streamed")
    assert chosen.peak.name != "chat"
    assert chosen.peak.total == estimate(SMOL, replace(s, chat_replies="text"), "streamed").peak.total


def test_shorter_e2e_windows_hold_less():
    """--e2e-seqlen: E2E-OQP's stages are estimated on its own windows' length (the logits and the
    saved activations of a step scale with it), the one-shot stages on --seqlen's; 0 is --seqlen."""
    s = MemorySettings(nsamples=128, seqlen=512, e2e_epochs=1, e2e_windows=384, e2e_batch=1)
    short = replace(s, e2e_windows=768, e2e_seqlen=256)
    assert s.e2e_len == 512 and short.e2e_len == 256 and short.e2e_tokens == s.e2e_tokens
    z = model_sizes(SMOL)
    long_st = {st.name: st.total for st in memory._streamed(z, s, 0)}
    short_st = {st.name: st.total for st in memory._streamed(z, short, 0)}
    assert short_st["e2e"] < long_st["e2e"] - 0.3 * GB
    for name in ("sensitivity", "one-shot"):
        assert short_st[name] == long_st[name]
    assert replace(s, e2e_seqlen=512).e2e_len == s.e2e_len


def test_packed_rows_counted_at_the_files_block_size():
    """gqsa3 rows take 10 bytes a kept group, gqsa4's 12: the export holds them all, the one-shot one
    block's; the spec's code width reaches the settings."""
    import dataclasses

    from gqsa_gguf.config import CONVERT_E2E, CalibConfig, CompressionConfig, ConvertConfig

    s4 = MemorySettings(sparsity=0.4, e2e_epochs=0)
    s3 = replace(s4, bits=3)
    rows = {b: estimate(SMOL, s, "streamed", checkpoint_bytes=1).stage("export").terms["gqsa rows"]
            for b, s in ((4, s4), (3, s3))}
    kept = 0.6 * model_sizes(SMOL).linear
    assert rows == {4: int(kept * 12 / 16), 3: int(kept * 10 / 16)}
    one4, one3 = (estimate(SMOL, s, "streamed", checkpoint_bytes=1).stage("one-shot").terms["one block compressed"]
                  for s in (s4, s3))
    assert one3 < one4
    info = model_io.inspect_checkpoint(tiny_models.checkpoint("llama"))
    cfg = ConvertConfig(model=str(info.folder), output="x.gguf", compression=CompressionConfig.from_spec("w3s40"),
                        calib=CalibConfig(nsamples=4, seqlen=64, batch_size=4),
                        e2e=dataclasses.replace(CONVERT_E2E, epochs=0))
    assert MemorySettings.from_config(cfg, info).bits == 3
