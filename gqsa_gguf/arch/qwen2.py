"""Qwen2 (Qwen2ForCausalLM: Qwen2, Qwen2.5) -> llama.cpp's `qwen2` graph.

NeoX RoPE in llama.cpp (rotate_half, as in HF), so q/k rows keep their order; q/k/v biases.
"""

from . import DecoderLayout, block_tensors_with, register


@register
class Qwen2(DecoderLayout):
    hf_architectures = ("Qwen2ForCausalLM",)
    gguf_arch = "qwen2"
    hf_config_class = "Qwen2Config"
    attention_bias = True
    block_tensors = block_tensors_with({"self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                                        "self_attn.v_proj.bias": "attn_v.bias"}, after="self_attn.o_proj.weight")

    def hf_config_from_gguf(self, common: dict, head_dim: int, theta: float):
        import transformers

        return transformers.Qwen2Config(rope_theta=theta, use_sliding_window=False, **common)
