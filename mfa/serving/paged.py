"""`PagedKVCache`: K/V of many sequences in a shared page pool, addressed through block tables.

Every layer has a pool ``k (num_pages, page_size, Hkv, D)``, ``v (num_pages, page_size, Hkv, Dv)``; page
ids are shared by all layers. A sequence owns an ordered list of pages: its position ``j`` lives in page
``pages[j // page_size]`` at row ``j % page_size``. Pages are reference counted (`PagePool`): forks and
identical prompt prefixes share pages, and a write into a shared page first copies it (copy-on-write).

One forward pass over a batch of sequences goes through `PagedKVCache.batch`, which reserves room for the
new tokens and returns a `PagedBatch` with a ``block_table (B, max_pages)`` (``-1`` = unused),
``cache_seqlens (B,)`` and one `PagedLayer` cache per model layer::

    batch = cache.batch([seq_a, seq_b], num_new=1)
    logits = model(tokens, cache=batch.layers)       # each layer: c.attend(q, k, v, scale=...)
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from mfa.serving.attend import cached_attention, gather_rows
from mfa.serving.pool import PagePool
from mfa.serving.view import KVView


@dataclasses.dataclass
class _Sequence:
    pages: List[int]
    length: int


class PagedKVCache:
    """Paged K/V storage for ``num_layers`` layers and any number of sequences.

    The pools are allocated on the first write of each layer, with that write's ``Hkv``, ``D`` and dtype.

    Args:
        num_pages: pages in the pool (shared by all sequences).
        page_size: tokens per page. Default: ``16``.
        num_layers: model layers (one pool each). Default: ``1``.
    """

    def __init__(self, num_pages: int, page_size: int = 16, num_layers: int = 1):
        if page_size < 1 or num_layers < 1:
            raise ValueError(f"{page_size=} and {num_layers=} must be positive")
        self.page_size = page_size
        self.num_layers = num_layers
        self.pool = PagePool(num_pages)
        self.k_pages: List[Optional[mx.array]] = [None] * num_layers
        self.v_pages: List[Optional[mx.array]] = [None] * num_layers
        self._seqs: Dict[int, _Sequence] = {}
        self._next_id = 0

    # -- sequences ---------------------------------------------------------------------------------

    def add_sequence(self, shared_pages: Sequence[int] = ()) -> int:
        """Start a sequence, optionally on full pages already holding its first tokens (a shared prefix).

        Args:
            shared_pages: live pages holding tokens ``0 .. len(shared_pages)·page_size - 1``; they gain a
                reference.

        Returns:
            the new sequence id.
        """
        self.pool.share(shared_pages)
        return self._new(list(shared_pages), len(shared_pages) * self.page_size)

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing every page (and the length) of ``seq_id``; writes copy on demand."""
        src = self._get(seq_id)
        self.pool.share(src.pages)
        return self._new(list(src.pages), src.length)

    def free(self, seq_id: int) -> None:
        """Drop a sequence; its pages lose one reference (free once nobody else holds them)."""
        seq = self._get(seq_id)
        del self._seqs[seq_id]
        self.pool.release(seq.pages)

    def length(self, seq_id: int) -> int:
        return self._get(seq_id).length

    def pages(self, seq_id: int) -> List[int]:
        return list(self._get(seq_id).pages)

    @property
    def sequences(self) -> List[int]:
        return list(self._seqs)

    def pages_needed(self, seq_id: int, num_new: int) -> int:
        """Pages an append of ``num_new`` tokens would allocate (copy-on-write included)."""
        seq = self._get(seq_id)
        total = -(-(seq.length + num_new) // self.page_size)
        cow = num_new > 0 and seq.length % self.page_size != 0 and self.pool.refcount[seq.pages[-1]] > 1
        return max(0, total - len(seq.pages)) + int(cow)

    def _new(self, pages: List[int], length: int) -> int:
        seq_id = self._next_id
        self._next_id += 1
        self._seqs[seq_id] = _Sequence(pages, length)
        return seq_id

    def _get(self, seq_id: int) -> _Sequence:
        if seq_id not in self._seqs:
            raise ValueError(f"unknown sequence id {seq_id} (live: {sorted(self._seqs)})")
        return self._seqs[seq_id]

    # -- a forward pass ----------------------------------------------------------------------------

    def batch(self, seq_ids: Sequence[int], num_new: int) -> "PagedBatch":
        """Reserve room for ``num_new`` tokens in each sequence and describe the batch for one forward.

        All-or-nothing: if the pool cannot hold every row's new pages, `PoolFullError` is raised and
        nothing changes.

        Args:
            seq_ids: the ``B`` sequences of the batch (distinct).
            num_new: tokens appended to every row by this forward pass.

        Returns:
            a `PagedBatch`; its sequences' lengths already count the new tokens.
        """
        if len(set(seq_ids)) != len(seq_ids) or not seq_ids:
            raise ValueError(f"seq_ids={list(seq_ids)} must be distinct and non-empty")
        if num_new < 1:
            raise ValueError(f"{num_new=} must be positive")
        seqs = [self._get(s) for s in seq_ids]
        self.pool.ensure_free(sum(self.pages_needed(s, num_new) for s in seq_ids))
        starts = np.array([s.length for s in seqs], dtype=np.int64)
        for seq in seqs:
            self._grow(seq, num_new)
        lengths = starts + num_new
        width = max(len(s.pages) for s in seqs)
        table = np.full((len(seqs), width), -1, dtype=np.int32)
        for b, seq in enumerate(seqs):
            table[b, : len(seq.pages)] = seq.pages
        # flat pool row of every new token: page id * page_size + row within the page
        pos = starts[:, None] + np.arange(num_new)[None]
        slots = table[np.arange(len(seqs))[:, None], pos // self.page_size] * self.page_size + pos % self.page_size
        return PagedBatch(self, list(seq_ids), starts, lengths, table, slots.reshape(-1).astype(np.int32))

    def _grow(self, seq: _Sequence, num_new: int) -> None:
        """Copy the partly filled last page if shared (copy-on-write), then add pages for the new tokens."""
        if seq.length % self.page_size != 0 and self.pool.refcount[seq.pages[-1]] > 1:
            old = seq.pages[-1]
            (new,) = self.pool.allocate(1)
            for layer in range(self.num_layers):
                if self.k_pages[layer] is not None:
                    self.k_pages[layer][new] = self.k_pages[layer][old]
                    self.v_pages[layer][new] = self.v_pages[layer][old]
            self.pool.release([old])
            seq.pages[-1] = new
        total = -(-(seq.length + num_new) // self.page_size)
        if total > len(seq.pages):
            seq.pages.extend(self.pool.allocate(total - len(seq.pages)))
        seq.length += num_new

    def write(self, layer: int, slots: mx.array, keys: mx.array, values: mx.array) -> None:
        """Store ``keys (B, Hkv, S, D)``/``values (B, Hkv, S, Dv)`` at flat pool rows ``slots (B·S,)``."""
        B, Hkv, S, D = keys.shape
        if self.k_pages[layer] is None:
            shape = (self.pool.num_pages, self.page_size, Hkv)
            self.k_pages[layer] = mx.zeros((*shape, D), keys.dtype)
            self.v_pages[layer] = mx.zeros((*shape, values.shape[3]), values.dtype)
        k_pool, v_pool = self.k_pages[layer], self.v_pages[layer]
        if (Hkv, D, values.shape[3]) != (k_pool.shape[2], k_pool.shape[3], v_pool.shape[3]):
            raise ValueError(
                f"new keys {tuple(keys.shape)}/values {tuple(values.shape)} do not match the layer-{layer} pools "
                f"{tuple(k_pool.shape)}/{tuple(v_pool.shape)}"
            )
        rows = self.pool.num_pages * self.page_size
        k_flat, v_flat = k_pool.reshape(rows, Hkv, D), v_pool.reshape(rows, Hkv, -1)
        k_flat[slots] = keys.transpose(0, 2, 1, 3).reshape(B * S, Hkv, D).astype(k_pool.dtype)
        v_flat[slots] = values.transpose(0, 2, 1, 3).reshape(B * S, Hkv, -1).astype(v_pool.dtype)
        self.k_pages[layer], self.v_pages[layer] = k_flat.reshape(k_pool.shape), v_flat.reshape(v_pool.shape)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in (*self.k_pages, *self.v_pages) if x is not None)


class PagedBatch:
    """One forward pass over ``B`` sequences of a `PagedKVCache`, each appending ``num_new`` tokens.

    Attributes:
        seq_ids: the sequences, in batch order.
        starts: ``(B,)`` NumPy, position of each row's first new token.
        block_table: ``(B, max_pages)`` int32, ``-1`` = unused.
        cache_seqlens: ``(B,)`` int32, tokens per row including the new ones.
        layers: one `PagedLayer` per model layer (pass as the model's ``cache``).
    """

    def __init__(self, cache: PagedKVCache, seq_ids, starts, lengths, table, slots):
        self.cache = cache
        self.seq_ids = seq_ids
        self.starts = starts
        self.lengths = lengths
        self.table = table
        self.block_table = mx.array(table)
        self.cache_seqlens = mx.array(lengths.astype(np.int32))
        self.slots = mx.array(slots)
        self._checked = -1  # pool version the block table was last checked against
        self.layers = [PagedLayer(self, layer) for layer in range(cache.num_layers)]

    def view(self, layer: int) -> KVView:
        """The batch's `KVView` of one layer, checked against the live pages.

        Every layer shares the block table: it is checked again only when the pool changed since.
        """
        cache = self.cache
        if cache.k_pages[layer] is None:
            raise ValueError(f"layer {layer} has no keys yet: write before attending")
        fresh = self._checked != cache.pool.version
        view = KVView.paged(cache.k_pages[layer], cache.v_pages[layer], self.table, self.lengths,
                            live_pages=cache.pool.live() if fresh else None, check=fresh)
        self._checked = cache.pool.version
        return view


class PagedLayer:
    """The cache one model layer sees during a `PagedBatch` forward (the mfa model protocol)."""

    def __init__(self, batch: PagedBatch, layer: int):
        self.batch = batch
        self.layer = layer

    @property
    def offset(self) -> Union[int, mx.array]:
        """Position of the first new token: an int if every row agrees, else ``(B,)`` int32 (for RoPE)."""
        starts = self.batch.starts
        if (starts == starts[0]).all():
            return int(starts[0])
        return mx.array(starts.astype(np.int32))

    def kv_view(self) -> KVView:
        return self.batch.view(self.layer)

    def attend(self, q: mx.array, keys: mx.array, values: mx.array, **options) -> mx.array:
        """Write ``keys``/``values (B, Hkv, S, ·)`` and attend ``q (B, H, S, D)`` over each row's pages."""
        self._write(keys, values)
        return cached_attention(q, self.kv_view(), **options)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """mlx-lm protocol: write, then return every row's K/V gathered contiguous (rows of equal length).

        Returns:
            ``(keys (B, Hkv, N, D), values (B, Hkv, N, Dv))`` with ``N`` the common row length.
        """
        self._write(keys, values)
        lengths = self.batch.lengths
        if not (lengths == lengths[0]).all():
            raise ValueError(f"rows have different lengths {lengths.tolist()}: use attend() instead")
        return gather_rows(self.kv_view(), int(lengths[0]))

    def _write(self, keys: mx.array, values: mx.array) -> None:
        S = int(self.batch.slots.shape[0]) // len(self.batch.seq_ids)
        if keys.ndim != 4 or keys.shape[0] != len(self.batch.seq_ids) or keys.shape[2] != S:
            raise ValueError(f"keys must be (B={len(self.batch.seq_ids)}, Hkv, S={S}, D), got {tuple(keys.shape)}")
        self.batch.cache.write(self.layer, self.batch.slots, keys, values)
