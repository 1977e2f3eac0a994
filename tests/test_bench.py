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


def test_equal_size_file_types_are_llama_cpps_quantizer_mixes(tmp_path):
    # Q3_K_S, Q2_K and IQ3_XXS as llama-quantize makes them (its per-tensor mix, from an F16 model of
    # the shape), the embeddings kept Q8_0; IQ3_XXS is refused without an importance matrix, so the
    # bench passes one of ones; llama.cpp then decodes every file (speed is the benchmark's business)
    import json
    import subprocess
    import sys
    import textwrap

    from gqsa_gguf import runtime
    shape = bench.Shape("tiny256", 256, 512, 1, 4, 4, n_vocab=4096)     # time_model uses ids < 2100
    for name in bench.QUANTIZED:
        assert bench.fits(name, shape) and not bench.fits(name, bench.PRESETS["smollm2-135m"])
    src = tmp_path / "f16.gguf"
    bench.write_model(shape, "f16", src, bench._RandomWeights(seed=0))
    code = f"""
        import ctypes, json
        from pathlib import Path
        from gqsa_gguf import bench, runtime
        ll = runtime.import_llama_cpp()
        shape = bench.Shape("tiny256", 256, 512, 1, 4, 4, n_vocab=4096)
        out = {{}}
        for name in bench.QUANTIZED:
            path = Path({str(tmp_path)!r}) / f"{{name}}.gguf"
            info = bench.quantize_model(ll, Path({str(src)!r}), name, path, shape, threads=2)
            pp, tg = bench.time_model(ll, path, 1, 16, 4)
            out[name] = dict(info, pp=pp, tg=tg)
        p = ll.llama_model_quantize_default_params()         # IQ3_XXS without an importance matrix
        p.ftype = bench.QUANTIZED["iq3_xxs"][0]
        p.nthread = 2
        out["iq3_xxs_no_imatrix_rc"] = ll.llama_model_quantize({str(src)!r}.encode(),
                                                               {str(tmp_path / "x.gguf")!r}.encode(), ctypes.byref(p))
        print(json.dumps(out))
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, runtime.LIB_DIR_ENV: str(runtime.lib_dir())})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("iq3_xxs_no_imatrix_rc") != 0
    # llama.cpp's mix for a LLaMA without GQA (q, k, v, o, gate, up, down): Q3_K_S is Q3_K throughout;
    # Q2_K keeps attn_v, attn_output and ffn_down in Q3_K; IQ3_XXS puts attn_q/attn_k in IQ2_S and
    # attn_output in IQ3_S
    assert out["q3_k_s"]["types"] == {"q3_k": 7}
    assert out["q2_k"]["types"] == {"q2_k": 4, "q3_k": 3}
    assert out["iq3_xxs"]["types"] == {"iq3_xxs": 4, "iq2_s": 2, "iq3_s": 1}
    bits = {"q3_k": 3.4375, "q2_k": 2.625, "iq3_xxs": 3.0625, "iq2_s": 2.5625, "iq3_s": 3.4375}   # per 256 weights
    r = gguf.GGUFReader(str(tmp_path / "q2_k.gguf"))
    sizes = {t.name.split(".")[2]: int(t.n_elements) for t in r.tensors if t.name.startswith("blk.0.")}
    linear = [n for n, _, _ in shape.linear()]
    assert {t.name: t.tensor_type.name for t in r.tensors if t.name == "token_embd.weight"} == {"token_embd.weight": "Q8_0"}
    for name, info in out.items():
        f = gguf.GGUFReader(str(tmp_path / f"{name}.gguf"))
        want = sum(bits[t.tensor_type.name.lower()] * sizes[t.name.split(".")[2]] / 8
                   for t in f.tensors if t.name.split(".")[-2] in linear)
        assert info["linear_bytes"] == want and info["n_linear"] == sum(sizes[n] for n in linear)
        assert info["bytes_per_token"] == sum(int(t.n_bytes) for t in f.tensors)
        assert info["pp"] > 0 and info["tg"] > 0
    rows = [{"format": n, "threads": 1, "bpw": 3.0, "pp_tok_s": 1.0, "decode_tok_s": 1.0, "bytes_per_token": 1e6,
             "decode_bound_tok_s": 1.0, "bound_fraction": 1.0, "bandwidth_GBps": 1.0, "types": out[n]["types"]}
            for n in out]
    assert "q3_k_s: 7 Q3_K; iq3_xxs: 4 IQ3_XXS, 2 IQ2_S, 1 IQ3_S; q2_k: 4 Q2_K, 3 Q3_K." in bench.markdown(rows, shape, 16, 4)
