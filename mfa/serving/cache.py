"""Contiguous KV caches in mlx-lm's layout: `KVCache` (grown in steps) and `RotatingKVCache` (ring buffer).

Both follow mlx-lm's cache protocol (``update_and_fetch``, ``offset``, ``state``, ``trim``), so mlx-lm
style models can use them, and add ``kv_view()`` (for `decode_attention`) and ``attend()`` (the mfa model
protocol, see `attend.py`). Keys and values are ``(B, Hkv, N, D)`` with every row at the same length.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from mfa.serving.attend import cached_attention
from mfa.serving.view import KVView


class GrowingCache:
    """mlx-lm's cache protocol for the caches that append tokens at ``offset`` and can drop the last ones."""

    keys = None
    offset = 0

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens; returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n


class KVCache(GrowingCache):
    """Contiguous K/V cache ``(B, Hkv, N, D)``, grown ``step`` tokens at a time.

    Args:
        step: growth increment in tokens. Default: ``256``.
    """

    def __init__(self, step: int = 256):
        if step < 1:
            raise ValueError(f"{step=} must be positive")
        self.step = step
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append ``keys (B, Hkv, S, D)``, ``values (B, Hkv, S, Dv)``; return all cached K/V.

        Returns:
            ``(keys, values)`` of shapes ``(B, Hkv, offset, D)`` and ``(B, Hkv, offset, Dv)``.
        """
        _check_new(keys, values, self.keys, self.values)
        prev, S = self.offset, keys.shape[2]
        if self.keys is None or prev + S > self.keys.shape[2]:
            # grow: round the new capacity up to whole steps
            n_new = -(-(prev + S) // self.step) * self.step - (0 if self.keys is None else prev)
            B, Hkv = keys.shape[:2]
            new_k = mx.zeros((B, Hkv, n_new, keys.shape[3]), keys.dtype)
            new_v = mx.zeros((B, Hkv, n_new, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset = prev + S
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def kv_view(self) -> KVView:
        """The cached tokens as a contiguous `KVView` (no copy of the buffers)."""
        if self.keys is None:
            raise ValueError("the cache is empty: append keys/values before attending")
        return KVView.contiguous(self.keys, self.values, self.offset)

    def attend(self, q: mx.array, keys: mx.array, values: mx.array, **options) -> mx.array:
        """Append ``keys``/``values`` and attend ``q (B, H, S, D)`` over the cache (see `cached_attention`)."""
        self.update_and_fetch(keys, values)
        return cached_attention(q, self.kv_view(), **options)

    def to_quantized(self, group_size: int = 64, bits: int = 8):
        """A `QuantizedKVCache` holding this cache's tokens."""
        from mfa.serving.quantized import QuantizedKVCache

        cache = QuantizedKVCache(group_size=group_size, bits=bits, step=self.step)
        if self.keys is not None:
            cache.update_and_fetch(self.keys[..., : self.offset, :], self.values[..., : self.offset, :])
        return cache

    @property
    def state(self):
        return self.keys, self.values, self.offset

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset = v

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class RotatingKVCache:
    """Sliding-window K/V cache: a ring of ``max_size`` slots; position ``p`` lives in slot ``p % max_size``.

    Memory stays fixed. Attention through it sees, for a query at position ``p``, the keys
    ``p - max_size + 1 .. p`` (window ``(max_size - 1, 0)``), whatever the chunk size.

    Args:
        max_size: number of slots (the window length, the query's own token included).
    """

    def __init__(self, max_size: int):
        if max_size < 1:
            raise ValueError(f"{max_size=} must be positive")
        self.max_size = max_size
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

    @property
    def window(self) -> Tuple[int, int]:
        """The ``(left, right)`` window this cache keeps for causal attention."""
        return (self.max_size - 1, 0)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append ``S`` tokens; return the keys/values the ``S`` new queries need, oldest first.

        Returns:
            ``(keys, values)`` covering positions ``max(0, offset - S - max_size + 1) .. offset - 1``
            (with ``offset`` after the append), in temporal order: attend with a causal mask and window
            `window`.
        """
        _check_new(keys, values, self.keys, self.values)
        older = self._temporal(min(self.offset, self.max_size - 1))
        self._write(keys, values)
        if older is None:
            return keys, values
        return mx.concatenate([older[0], keys], axis=2), mx.concatenate([older[1], values], axis=2)

    def _temporal(self, n: int):
        """The last ``n`` cached tokens in temporal order, or None."""
        if n == 0 or self.keys is None:
            return None
        slots = (np.arange(self.offset - n, self.offset) % self.max_size).astype(np.int32)
        idx = mx.array(slots)
        return self.keys[:, :, idx], self.values[:, :, idx]

    def _write(self, keys: mx.array, values: mx.array) -> None:
        """Store the last ``min(S, max_size)`` of the new tokens into their ring slots."""
        B, Hkv, S, _ = keys.shape
        if self.keys is None:
            self.keys = mx.zeros((B, Hkv, self.max_size, keys.shape[3]), keys.dtype)
            self.values = mx.zeros((B, Hkv, self.max_size, values.shape[3]), values.dtype)
        keep = min(S, self.max_size)
        positions = np.arange(self.offset + S - keep, self.offset + S)
        slots = mx.array((positions % self.max_size).astype(np.int32))
        self.keys[:, :, slots] = keys[:, :, S - keep :]
        self.values[:, :, slots] = values[:, :, S - keep :]
        self.offset += S

    def key_positions(self) -> np.ndarray:
        """``(max_size,)`` absolute position held by each slot, ``-1`` for a slot never written."""
        slots = np.arange(self.max_size)
        last = self.offset - 1
        pos = last - ((last - slots) % self.max_size)
        return np.where(pos >= 0, pos, -1).astype(np.int32)

    def kv_view(self) -> KVView:
        """The ring as a `KVView` (slots with their positions; order does not matter to attention)."""
        if self.keys is None:
            raise ValueError("the cache is empty: append keys/values before attending")
        return KVView.ring(self.keys, self.values, self.key_positions()[None], self.offset)

    def attend(self, q: mx.array, keys: mx.array, values: mx.array, **options) -> mx.array:
        """Append ``keys``/``values`` and attend ``q (B, H, S, D)`` within the window.

        A window option, if given, must fit in the cache (``left <= max_size - 1``).
        """
        window = _fit_window(options.pop("window", None), self.max_size)
        S = q.shape[2]
        if S == 1:
            self._write(keys, values)
            return cached_attention(q, self.kv_view(), window=window, **options)
        k, v = self.update_and_fetch(keys, values)
        return cached_attention(q, KVView.contiguous(k, v, k.shape[2]), window=window, **options)

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.max_size

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.max_size = v

    def size(self) -> int:
        return min(self.offset, self.max_size)

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def _fit_window(window, max_size: int) -> Tuple[int, int]:
    """The window of a rotating cache, narrowed by a requested one; too wide a request raises."""
    if window is None:
        return (max_size - 1, 0)
    left, right = window
    if left == -1 or left > max_size - 1:
        raise ValueError(f"window={tuple(window)} reaches further back than the cache holds ({max_size=})")
    return (left, 0 if right == -1 else min(right, 0))


def _check_new(keys: mx.array, values: mx.array, old_k: Optional[mx.array], old_v: Optional[mx.array]) -> None:
    """New K/V must be ``(B, Hkv, S, D)``/``(B, Hkv, S, Dv)`` and match what is cached."""
    if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3]:
        raise ValueError(
            f"keys/values must be (B, Hkv, S, D)/(B, Hkv, S, Dv), got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if old_k is not None:
        if keys.shape[:2] != old_k.shape[:2] or keys.shape[3] != old_k.shape[3] or values.shape[3] != old_v.shape[3]:
            raise ValueError(
                f"new keys {tuple(keys.shape)} do not match the cached {tuple(old_k.shape)} (B, Hkv, D must agree)"
            )
