"""`KVView`: the arrays a decode reads, in one of three layouts, checked before any read.

Every cache hands `decode_attention` a `KVView`:

* ``contiguous``: ``k (B, Hkv, N, D)``, ``v (B, Hkv, N, Dv)``; key slot ``j`` holds position ``j``
  (``token_major``: stored ``(B, N, Hkv, D)`` instead, flash-attention's cache layout).
* ``paged``: ``k (num_pages, page_size, Hkv, D)`` page pool plus ``block_table (B, max_pages)`` int32
  (``-1`` = unused); logical position ``j`` of row ``b`` lives in page ``block_table[b, j // page_size]``.
* ``ring`` (sliding window): contiguous slots whose absolute positions are ``key_positions (B|1, N)``
  (``-1`` = empty slot).

``k``/``v`` may also be ``(packed, scales, biases)`` triples from `mx.quantize` (contiguous only).
``seqlens (B,)`` counts the tokens of each row, the new ones included; the ``Nq`` queries of a decode are
the last ``Nq`` of them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

Arrays = Union[mx.array, Tuple[mx.array, mx.array, mx.array]]

CONTIGUOUS, PAGED, RING = "contiguous", "paged", "ring"


class KVView(NamedTuple):
    """The keys/values of a batch of cached sequences.

    Attributes:
        layout: ``"contiguous"``, ``"paged"`` or ``"ring"``.
        k: keys, ``(B, Hkv, N, D)`` (contiguous/ring) or ``(num_pages, page_size, Hkv, D)`` (paged), or a
            quantized ``(packed, scales, biases)`` triple of the contiguous shape.
        v: values, same layout as ``k`` with ``Dv`` last.
        seqlens: ``(B,)`` int32, tokens per row (the new ones included).
        seqlens_host: the same as a NumPy array (used to skip empty splits without a device sync).
        block_table: ``(B, max_pages)`` int32 (paged only).
        key_positions: ``(B|1, N)`` int32 absolute position of each slot, ``-1`` = empty (ring only).
        group_size: quantization group size (quantized only).
        bits: quantization bits (quantized only).
        token_major: contiguous K/V are stored ``(B, N, Hkv, D)`` (not ``(B, Hkv, N, D)``).
    """

    layout: str
    k: Arrays
    v: Arrays
    seqlens: mx.array
    seqlens_host: np.ndarray
    block_table: Optional[mx.array] = None
    key_positions: Optional[mx.array] = None
    group_size: Optional[int] = None
    bits: Optional[int] = None
    token_major: bool = False

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def batch_size(self) -> int:
        return int(self.seqlens.shape[0])

    @property
    def num_kv_heads(self) -> int:
        k = self.k[0] if self.quantized else self.k
        return int(k.shape[2] if self.layout == PAGED or self.token_major else k.shape[1])

    @property
    def head_dim(self) -> int:
        if self.quantized:
            return int(self.k[0].shape[-1] * 32 // self.bits)
        return int(self.k.shape[-1])

    @property
    def value_dim(self) -> int:
        if self.quantized:
            return int(self.v[0].shape[-1] * 32 // self.bits)
        return int(self.v.shape[-1])

    @property
    def page_size(self) -> int:
        return int(self.k.shape[1])

    @property
    def num_slots(self) -> int:
        """Key slots per row: ``N`` (contiguous/ring) or ``max_pages * page_size`` (paged)."""
        if self.layout == PAGED:
            return int(self.block_table.shape[1]) * self.page_size
        k = self.k[0] if self.quantized else self.k
        return int(k.shape[1] if self.token_major else k.shape[2])

    @property
    def dtype(self) -> mx.Dtype:
        return self.k[1].dtype if self.quantized else self.k.dtype

    @classmethod
    def contiguous(cls, k: Arrays, v: Arrays, seqlens, *, group_size=None, bits=None, token_major=False,
                   check=True) -> "KVView":
        """A view of ``k (B, Hkv, N, D)``, ``v (B, Hkv, N, Dv)`` holding ``seqlens`` tokens per row.

        Args:
            k: ``(B, Hkv, N, D)`` keys, or a quantized ``(packed, scales, biases)`` triple.
            v: ``(B, Hkv, N, Dv)`` values, or a quantized triple.
            seqlens: an int (every row) or ``(B,)`` ints, each in ``[0, N]``.
            group_size: quantization group size when ``k``/``v`` are triples.
            bits: quantization bits when ``k``/``v`` are triples.
            token_major: ``k``/``v`` are ``(B, N, Hkv, D)``/``(B, N, Hkv, Dv)`` (read in place, no transpose).
            check: validate shapes and lengths (raises ``ValueError``).
        """
        kk = k[0] if bits is not None else k
        B = int(kk.shape[0])
        lens_host, lens = _seqlens(seqlens, B)
        if token_major and bits is not None:
            raise ValueError("quantized K/V must be (B, Hkv, N, D): token_major is not supported")
        view = cls(CONTIGUOUS, k, v, lens, lens_host, group_size=group_size, bits=bits, token_major=token_major)
        if check:
            view.check()
        return view

    @classmethod
    def paged(cls, k_pages: mx.array, v_pages: mx.array, block_table, seqlens, *, live_pages=None,
              check=True) -> "KVView":
        """A view of a page pool through a block table.

        Args:
            k_pages: ``(num_pages, page_size, Hkv, D)`` key pool.
            v_pages: ``(num_pages, page_size, Hkv, Dv)`` value pool.
            block_table: ``(B, max_pages)`` int32 page ids, ``-1`` = unused.
            seqlens: an int or ``(B,)`` ints, each at most ``max_pages * page_size``.
            live_pages: optional boolean ``(num_pages,)`` NumPy mask of allocated pages; a table entry
                naming a page that is not live (a freed page) is an error.
            check: validate (raises ``ValueError``).
        """
        table_host = np.asarray(block_table, dtype=np.int64) if not isinstance(block_table, mx.array) else None
        table = mx.array(block_table, dtype=mx.int32) if table_host is not None else block_table.astype(mx.int32)
        if table.ndim != 2:
            raise ValueError(f"block_table must be (B, max_pages), got shape {tuple(table.shape)}")
        lens_host, lens = _seqlens(seqlens, int(table.shape[0]))
        view = cls(PAGED, k_pages, v_pages, lens, lens_host, block_table=table)
        if check:
            view.check(table_host=table_host, live_pages=live_pages)
        return view

    @classmethod
    def ring(cls, k: mx.array, v: mx.array, key_positions, seqlens, *, check=True) -> "KVView":
        """A view of ring-buffer slots ``k (B, Hkv, N, D)`` whose positions are ``key_positions (B|1, N)``."""
        lens_host, lens = _seqlens(seqlens, int(k.shape[0]))
        view = cls(RING, k, v, lens, lens_host, key_positions=mx.array(key_positions, dtype=mx.int32))
        if check:
            view.check()
        return view

    def check(self, table_host: Optional[np.ndarray] = None, live_pages: Optional[np.ndarray] = None) -> None:
        """Raise ``ValueError`` for shapes that disagree, lengths past capacity and bad block tables."""
        k, v = (self.k[0], self.v[0]) if self.quantized else (self.k, self.v)
        if k.ndim != 4 or v.ndim != 4:
            raise ValueError(f"k and v must be 4-D, got shapes {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ before the last axis")
        if self.quantized and self.layout != CONTIGUOUS:
            raise ValueError(f"quantized K/V support the contiguous layout only, got {self.layout!r}")
        B = self.batch_size
        if self.layout != PAGED and k.shape[0] != B:
            raise ValueError(f"seqlens has {B} rows but the cache has batch {k.shape[0]}")
        lens = self.seqlens_host
        # a ring holds the last N positions of rows of any length; other layouts hold at most N tokens
        capacity = np.inf if self.layout == RING else self.num_slots
        if lens.size and (lens.min() < 0 or lens.max() > capacity):
            raise ValueError(f"cache_seqlens={lens.tolist()} must lie in [0, {capacity}] (the cache capacity)")
        if self.layout == PAGED:
            self._check_table(table_host, live_pages)
        if self.layout == RING and self.key_positions.shape[-1] != k.shape[2]:
            raise ValueError(
                f"key_positions has {self.key_positions.shape[-1]} slots but the cache has {k.shape[2]}"
            )

    def _check_table(self, table_host: Optional[np.ndarray], live_pages: Optional[np.ndarray]) -> None:
        num_pages, page_size = int(self.k.shape[0]), self.page_size
        table = table_host if table_host is not None else np.array(self.block_table, dtype=np.int64)
        if table.shape[0] != self.batch_size:
            raise ValueError(f"block_table has {table.shape[0]} rows but seqlens has {self.batch_size}")
        for b, n in enumerate(self.seqlens_host.tolist()):
            used = table[b, : -(-n // page_size)]
            bad = used[(used < 0) | (used >= num_pages)]
            if bad.size:
                raise ValueError(
                    f"block_table[{b}] names page {int(bad[0])} for one of its {n} tokens; pages must lie in "
                    f"[0, {num_pages})"
                )
            if live_pages is not None and not live_pages[used].all():
                dead = used[~live_pages[used]]
                raise ValueError(f"block_table[{b}] names freed page {int(dead[0])}")


def _seqlens(seqlens, B: int) -> Tuple[np.ndarray, mx.array]:
    """``(host, device)`` int32 copies of ``seqlens`` (an int or ``(B,)`` ints)."""
    host = np.asarray(seqlens, dtype=np.int64)
    if host.ndim == 0:
        host = np.full((B,), int(host), dtype=np.int64)
    if host.shape != (B,):
        raise ValueError(f"cache_seqlens must be an int or shape ({B},), got shape {host.shape}")
    if isinstance(seqlens, mx.array):
        return host, seqlens.astype(mx.int32).reshape(B)
    return host, mx.array(host.astype(np.int32))
