"""The model families the fused graph writes, as data: what compression, the graph writer and genai_config.json
read instead of testing class names (docs/adding-an-architecture.md). Torch-free.

Every family here is a pre-norm decoder with rotary attention and a gated MLP (its activation read from the
config); a spec states only where they differ. Compression itself needs no entry: it factorizes every nn.Linear
inside the decoder layers."""

from __future__ import annotations

from dataclasses import dataclass

QKV = ("q_proj", "k_proj", "v_proj")  # the projections that read the attention block's normed input
GATE_UP = ("gate_proj", "up_proj")  # the projections that read the MLP's normed input
JOINT_GROUPS = (QKV, GATE_UP)  # projections of one input: --joint factorizes each group as one unit


@dataclass(frozen=True)
class Architecture:
    model_class: str  # the transformers class
    genai_type: str  # onnxruntime-genai's model type in genai_config.json
    head_norms: bool = False  # RMSNorm over each head of q and k before rotary (Qwen3's q_norm, k_norm)
    # Where a layer's sliding window comes from: its attention module's `sliding_window` (Qwen2/3 set it on
    # the layers that slide, None elsewhere), or, with window_from_config, config.sliding_window on every layer
    window_from_config: bool = False
    # RMSNorms scale by (norm_offset + weight): Gemma stores weight - 1
    norm_offset: float = 0.0
    # The layer's norm before the MLP; Llama-style blocks call it post_attention_layernorm
    mlp_norm: str = "post_attention_layernorm"
    # "Sandwich" norms on each branch's output before its residual add (Gemma 2/3): the layer's attribute names
    attention_output_norm: str | None = None
    mlp_output_norm: str | None = None
    # The base model's rotary embedding of the sliding-window layers, where it differs from the global one's
    # (Gemma 3: rotary_emb_local, from rope_local_base_freq)
    local_rotary: str | None = None
    # Module names of the projections that read the attention's and the MLP's normed input: one fused module
    # (Phi-3's qkv_proj, gate_up_proj: [gate; up] stacked) or one module each
    qkv: tuple[str, ...] = QKV
    gate_up: tuple[str, ...] = GATE_UP


ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", "llama"),
    "mistral": Architecture("MistralForCausalLM", "mistral", window_from_config=True),
    "qwen2": Architecture("Qwen2ForCausalLM", "qwen2"),  # q/k/v biases: the writer adds any bias a Linear has
    "qwen3": Architecture("Qwen3ForCausalLM", "qwen3", head_norms=True),
    # Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj checkpoint weights, rotary on a part of each head,
    # the config's sliding window on every layer
    "phi3": Architecture("Phi3ForCausalLM", "phi3", window_from_config=True, qkv=("qkv_proj",),
                         gate_up=("gate_up_proj",)),
    # SmolLM3: Llama's layout; every fourth layer has no rotary embedding (its attention's use_rope, read per layer)
    "smollm3": Architecture("SmolLM3ForCausalLM", "smollm3"),
    # Gemma 3 text (270M, 1B; the text decoder of 4B+): GeGLU (tanh GELU), four (1 + w) RMSNorms per block,
    # q/k norms, interleaved sliding-window and global layers with their own rope bases, the embedding scaled by
    # sqrt(hidden) (its module's embed_scale: the writer reads any such buffer)
    "gemma3_text": Architecture("Gemma3ForCausalLM", "gemma3_text", head_norms=True, norm_offset=1.0,
                                mlp_norm="pre_feedforward_layernorm", attention_output_norm="post_attention_layernorm",
                                mlp_output_norm="post_feedforward_layernorm", local_rotary="rotary_emb_local"),
}
MODEL_CLASSES = tuple(spec.model_class for spec in ARCHITECTURES.values())


def architecture_of(model) -> Architecture | None:
    """The spec of `model`'s family (by its transformers class), or None where the fused writer has none."""
    name = type(model).__name__
    return next((spec for spec in ARCHITECTURES.values() if spec.model_class == name), None)
