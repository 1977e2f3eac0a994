"""gqsa-gguf bench: the synthetic models it writes (speed itself is measured by the benchmark, not here)."""

import os

import gguf
import pytest

from gqsa_gguf import bench


def test_synthetic_vocab_is_the_named_models(tmp_path):
    # llama-7b's output head is 32000 x 4096, not the embedded tokenizer's 49152 rows: the vocabulary
    # is cut, and only merges whose parts and join survive are kept
    assert bench.PRESETS["llama-7b"].n_vocab == 32000
    shape = bench.Shape("tiny", 64, 128, 1, 4, 4, n_vocab=1000)
    out = tmp_path / "tiny.gguf"
    bench.write_model(shape, "q8_0", out, bench._RandomWeights(seed=0))
    r = gguf.GGUFReader(str(out))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 1000 and len(r.fields["tokenizer.ggml.token_type"].contents()) == 1000
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert [int(n) for n in emb.shape] == [64, 1000]
    vocab = set(tokens)
    merges = r.fields["tokenizer.ggml.merges"].contents()
    assert merges, "a 1000-token vocabulary still has merges"
    for m in merges:
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab
    from gqsa_gguf.model_io import smollm2_gguf
    full = bench._tokenizer_fields(gguf.GGUFReader(str(smollm2_gguf())), None)
    assert len(merges) < len(full["tokenizer.ggml.merges"][0])


def test_saved_tokenizer_writes_the_same_model(tmp_path):
    # scripts/gpu_check.sh writes its benchmark models from a saved tokenizer (the GPU machine has no
    # embedded model): the file must be byte for byte the one written from the embedded model
    shape = bench.Shape("tiny", 64, 128, 1, 4, 4, n_vocab=1000)
    bench.save_tokenizer(shape, tmp_path / "tok.json")
    tok = bench.load_tokenizer(tmp_path / "tok.json", shape)
    bench.write_model(shape, "w4s50", tmp_path / "a.gguf", bench._RandomWeights(seed=0))
    bench.write_model(shape, "w4s50", tmp_path / "b.gguf", bench._RandomWeights(seed=0), tokenizer=tok)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    with pytest.raises(ValueError, match="not 'llama-7b'"):
        bench.load_tokenizer(tmp_path / "tok.json", bench.PRESETS["llama-7b"])


def test_synthetic_vocab_cannot_exceed_the_tokenizer(tmp_path):
    shape = bench.Shape("big", 64, 128, 1, 4, 4, n_vocab=10 ** 6)
    with pytest.raises(ValueError, match="needs more tokens"):
        bench.write_model(shape, "q8_0", tmp_path / "x.gguf", bench._RandomWeights(seed=0))


def test_bandwidth_probe_reads_through_the_native_library():
    import ctypes

    from gqsa_gguf import runtime

    fn = runtime.native_lib().gqsa_read_bandwidth
    fn.restype = ctypes.c_double
    fn.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
    assert fn(0, 1 << 20, 1) < 0 and fn(1, 1 << 20, 0) < 0          # refused arguments
    bw = fn(2, 64 << 20, 2)
    assert 1e8 < bw < 1e13, bw                                          # bytes/s of a real read
    assert bench.measure_bandwidth(1, nbytes=64 << 20, repeats=1) > 1e8


def test_machine_description_names_cpu_and_build_features():
    class FakeLlamaCpp:
        class llama_cpp:
            @staticmethod
            def llama_print_system_info():
                return b"CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | NEON = 1 | OPENMP = 1 | REPACK = 1 | "

    plain = bench.machine_description()
    assert f"{os.cpu_count()} logical CPU(s)" in plain and "llama.cpp build" not in plain
    text = bench.machine_description(FakeLlamaCpp)
    assert text.startswith(plain)
    # features switched on are listed in order; switched-off ones and non-SIMD switches are not
    assert text.endswith("; llama.cpp build with SSE3, AVX2, NEON")


def test_command_line_reproduces_the_settings():
    import argparse
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    argv = ["--synthetic", "llama-1b", "--formats", "q4_0,w4s50", "--threads", "2", "--decode", "64",
            "--rounds", "3", "--out-dir", "/tmp/x"]
    args = p.parse_args(argv)
    cmd = bench.command_line(args)
    assert cmd.startswith("gqsa-gguf bench ")
    again = p.parse_args(cmd.split()[2:])
    # every setting survives the round trip except where the files go
    assert {k: v for k, v in vars(again).items() if k not in ("out_dir", "keep_files")} == \
           {k: v for k, v in vars(args).items() if k not in ("out_dir", "keep_files")}
    assert f"Command: `{cmd}`." in bench.markdown([], bench.PRESETS["llama-1b"], 512, 64, cmd)


def test_plot_labels_of_one_width_are_stacked_apart():
    # three 4.5-bit formats 2-6 points apart, one 3-bit and one 8.5-bit format alone (y in points)
    pts = [(4.5, 100.0), (3.0, 200.0), (4.5, 106.0), (8.5, 103.0), (4.5, 108.0)]
    off = bench.label_offsets(pts, gap=9.0)
    assert off[1] == off[3] == 0.0                      # alone in their column: at their point
    assert off[0] == 0.0                                # the lowest of the column stays put
    at = sorted(y + d for (x, y), d in zip(pts, off) if x == 4.5)
    assert at == [100.0, 109.0, 118.0]                  # each the gap above the one below
    assert all(d >= 0 for d in off)


@pytest.mark.parametrize("name,bpw", [("q3_k", 3.4375), ("iq3_xxs", 3.0625), ("q2_k", 2.625)])
def test_equal_size_stock_types_decode_through_llama_cpp(tmp_path, name, bpw):
    # the ~3-bit types a llama.cpp user would pick instead of W4S50: written with their own type and
    # size, and llama.cpp decodes them (speed itself is the benchmark's business)
    import subprocess
    import sys
    import textwrap

    from gqsa_gguf import runtime
    shape = bench.Shape("tiny256", 256, 512, 1, 4, 4, n_vocab=4096)     # time_model uses ids < 2100
    assert bench.fits(name, shape) and not bench.fits(name, bench.PRESETS["smollm2-135m"])
    out = tmp_path / f"{name}.gguf"
    info = bench.write_model(shape, name, out, bench._RandomWeights(seed=0))
    assert info["linear_bytes"] * 8 / info["n_linear"] == bpw
    r = gguf.GGUFReader(str(out))
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type.name.lower() == name
    code = f"""
        from pathlib import Path
        from gqsa_gguf import bench, runtime
        ll = runtime.import_llama_cpp()
        pp, tg = bench.time_model(ll, Path({str(out)!r}), 1, 16, 4)
        assert pp > 0 and tg > 0
        print("ok")
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, runtime.LIB_DIR_ENV: str(runtime.lib_dir())})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
