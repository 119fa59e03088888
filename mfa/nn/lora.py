"""LoRA: low-rank adapters on the linear layers of a model, for fine-tuning (Hu et al., 2021)."""

from __future__ import annotations

import math
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``y = W x + (alpha / r) · B A x``.

    ``B`` starts at zero, so a fresh adapter leaves the model's output unchanged.

    Args:
        linear (nn.Linear): the layer to adapt (kept, and frozen by `apply_lora`).
        rank (int): ``r``, the rank of the update. Default: ``8``.
        alpha (float): the update is scaled by ``alpha / rank``. Default: ``16``.
    """

    def __init__(self, linear: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"{rank=} must be positive")
        out_dims, in_dims = linear.weight.shape
        self.linear = linear
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x: mx.array) -> mx.array:
        update = (x @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return self.linear(x) + self.scale * update


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
               targets: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> nn.Module:
    """Freeze ``model`` and wrap its linear layers named in ``targets`` with `LoRALinear`.

    Args:
        model: any module; changed in place.
        rank, alpha: as in `LoRALinear`.
        targets: attribute names of the ``nn.Linear`` layers to adapt.

    Returns:
        ``model``, whose only trainable parameters are now the adapters' ``lora_a``/``lora_b``.
    """
    targets = set(targets)
    model.freeze()
    found = 0
    for _, module in model.named_modules():
        for name, child in list(module.children().items()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
                found += 1
    if found == 0:
        raise ValueError(f"no nn.Linear named any of {sorted(targets)} in the model")
    return model
