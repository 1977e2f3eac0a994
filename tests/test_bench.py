"""gqsa-gguf bench: the synthetic models it writes (speed itself is measured by the benchmark, not here)."""

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
