"""The model families the fused graph writes, as data: what compression, the graph writer and genai_config.json
read instead of testing class names (docs/adding-an-architecture.md). Torch-free.

Every family here is a pre-norm decoder with rotary attention and a gated SiLU MLP; a spec states only where
they differ. Compression itself needs no entry: it factorizes every nn.Linear inside the decoder layers."""

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


ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", "llama"),
    "mistral": Architecture("MistralForCausalLM", "mistral", window_from_config=True),
    "qwen2": Architecture("Qwen2ForCausalLM", "qwen2"),  # q/k/v biases: the writer adds any bias a Linear has
    "qwen3": Architecture("Qwen3ForCausalLM", "qwen3", head_norms=True),
}
MODEL_CLASSES = tuple(spec.model_class for spec in ARCHITECTURES.values())


def architecture_of(model) -> Architecture | None:
    """The spec of `model`'s family (by its transformers class), or None where the fused writer has none."""
    name = type(model).__name__
    return next((spec for spec in ARCHITECTURES.values() if spec.model_class == name), None)
