"""`QuantizedKVCache`: K/V stored as `mx.quantize` (affine, 4 or 8 bit) triples, dequantized per split.

Layout is mlx-lm's: keys and values are each ``(packed uint32 (B, Hkv, N, D·bits/32), scales
(B, Hkv, N, D/group_size), biases (same))``. `decode_attention` never dequantizes the whole cache: each
split's scores and outputs come from `mx.quantized_matmul` on that split.

Error: each element is rounded to one of ``2**bits`` levels of its group's range (``group_size``
elements), so K/V carry an error up to half a level. The attention output then stays within 2e-2 of full
precision with 8 bits and within 2.5e-1 with 4 bits on unit-normal K/V (D=64, group 32; measured 6e-3 and
5e-2, tests/test_serving_decode.py); the split-K itself adds only float32 rounding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from mfa.serving.attend import cached_attention
from mfa.serving.cache import GrowingCache, _check_new
from mfa.serving.view import KVView

Triple = Tuple[mx.array, mx.array, mx.array]


class QuantizedKVCache(GrowingCache):
    """Contiguous K/V cache quantized to ``bits`` per element, grown ``step`` tokens at a time.

    Args:
        group_size: elements sharing one scale and bias (must divide the head dims). Default: ``64``.
        bits: ``4`` or ``8``. Default: ``8``.
        step: growth increment in tokens. Default: ``256``.
    """

    def __init__(self, group_size: int = 64, bits: int = 8, step: int = 256):
        if bits not in (4, 8):
            raise ValueError(f"{bits=} must be 4 or 8")
        if group_size not in (32, 64, 128):
            raise ValueError(f"{group_size=} must be 32, 64 or 128")
        self.group_size, self.bits, self.step = group_size, bits, step
        self.keys: Optional[Triple] = None
        self.values: Optional[Triple] = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[Triple, Triple]:
        """Quantize and append ``keys (B, Hkv, S, D)``, ``values (B, Hkv, S, Dv)``.

        Returns:
            ``(keys, values)`` quantized triples over the ``offset`` cached tokens.
        """
        for name, x in (("keys", keys), ("values", values)):
            if x.ndim == 4 and x.shape[-1] % self.group_size:
                raise ValueError(f"{name} head dim {x.shape[-1]} must be divisible by group_size={self.group_size}")
        _check_new(keys, values, None, None)
        prev, S = self.offset, keys.shape[2]
        if self.keys is None or prev + S > self.keys[0].shape[2]:
            capacity = -(-(prev + S) // self.step) * self.step
            self.keys = self._grow(self.keys, keys, capacity)
            self.values = self._grow(self.values, values, capacity)
        self.offset = prev + S
        for cached, new in ((self.keys, keys), (self.values, values)):
            for buf, part in zip(cached, mx.quantize(new, group_size=self.group_size, bits=self.bits)):
                buf[..., prev : self.offset, :] = part
        return self._fetch(self.keys), self._fetch(self.values)

    def _grow(self, old: Optional[Triple], new: mx.array, capacity: int) -> Triple:
        """Buffers for ``capacity`` tokens, the ``offset`` cached ones copied over."""
        B, Hkv, _, D = new.shape
        shapes = ((D * self.bits // 32, mx.uint32), (D // self.group_size, new.dtype), (D // self.group_size, new.dtype))
        bufs = tuple(mx.zeros((B, Hkv, capacity, n), dt) for n, dt in shapes)
        if old is not None:
            for buf, part in zip(bufs, old):
                buf[..., : self.offset, :] = part[..., : self.offset, :]
        return bufs

    def _fetch(self, triple: Triple) -> Triple:
        return tuple(x[..., : self.offset, :] for x in triple)

    def kv_view(self) -> KVView:
        """The cached tokens as a quantized contiguous `KVView` (no dequantization)."""
        if self.keys is None:
            raise ValueError("the cache is empty: append keys/values before attending")
        return KVView.contiguous(self.keys, self.values, self.offset, group_size=self.group_size, bits=self.bits)

    def attend(self, q: mx.array, keys: mx.array, values: mx.array, **options) -> mx.array:
        """Append ``keys``/``values`` and attend ``q (B, H, S, D)`` over the cache (see `cached_attention`)."""
        self.update_and_fetch(keys, values)
        return cached_attention(q, self.kv_view(), **options)

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.group_size, self.bits

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.group_size, self.bits = v

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))
