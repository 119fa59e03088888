"""Layers that run their attention through mfa: drop-ins for MLX layers and a small causal LM."""

from mfa.nn.attention import Attention, MultiHeadAttention, packed_positions
from mfa.nn.lora import LoRALinear, apply_lora
from mfa.nn.model import CausalLM, ModelConfig
from mfa.nn.transformer import SwiGLU, TransformerBlock

__all__ = [
    "Attention",
    "CausalLM",
    "LoRALinear",
    "ModelConfig",
    "MultiHeadAttention",
    "SwiGLU",
    "TransformerBlock",
    "apply_lora",
    "packed_positions",
]
