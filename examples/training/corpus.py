"""Byte-level corpora packed into fixed-size rows with ``cu_seqlens`` (no padding, no cross-document attention).

A corpus is a text file whose documents are separated by blank lines.  Each document becomes
``[EOS] + utf-8 bytes + [EOS]`` (token ids 0-255 are bytes, 256 is EOS), so the model needs no
tokenizer.  Training pairs are ``(inputs, targets) = (doc[:-1], doc[1:])``.

Packing: the documents of one epoch (shuffled per epoch with a fixed seed) are laid end to end and
cut into rows of exactly ``seq_len`` positions; a row's segments are the pieces of the documents it
holds, and attention never crosses them.  Row ``i`` is a pure function of ``(seed, i)``, so a
resumed run reads exactly the rows it would have read, and data-parallel ranks read disjoint rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, NamedTuple, Sequence

import mlx.core as mx
import numpy as np

EOS = 256
VOCAB_SIZE = 257
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def read_documents(path: Path) -> List[str]:
    """The non-empty documents of a corpus file (separated by blank lines)."""
    text = Path(path).read_text(encoding="utf-8")
    return [doc.strip("\n") for doc in text.split("\n\n") if doc.strip()]


def encode(text: str) -> np.ndarray:
    """``[EOS] + bytes + [EOS]`` as int32 token ids."""
    return np.concatenate([[EOS], np.frombuffer(text.encode("utf-8"), dtype=np.uint8), [EOS]]).astype(np.int32)


def decode(tokens: Sequence[int]) -> str:
    """Text of byte tokens (EOS and invalid utf-8 dropped)."""
    return bytes(int(t) for t in tokens if t < 256).decode("utf-8", errors="ignore")


def split_documents(docs: List[str], eval_fraction: float) -> tuple:
    """``(train_docs, eval_docs)``: the last ``eval_fraction`` of the documents is held out."""
    n_eval = max(1, int(round(len(docs) * eval_fraction)))
    if n_eval >= len(docs):
        raise ValueError(f"{eval_fraction=} leaves no training documents out of {len(docs)}")
    return docs[:-n_eval], docs[-n_eval:]


class Batch(NamedTuple):
    """Packed rows, ready for ``model(inputs, cu_seqlens=cu_seqlens)``.

    Attributes:
        inputs: ``(1, rows·seq_len)`` int32 token ids.
        targets: ``(1, rows·seq_len)`` int32 next tokens.
        cu_seqlens: ``(S+1,)`` int32 segment boundaries (no segment crosses a row).
    """

    inputs: mx.array
    targets: mx.array
    cu_seqlens: mx.array


class PackedRows:
    """Documents packed into rows of ``seq_len`` tokens; epochs reshuffle the document order.

    Args:
        docs: the documents (text).
        seq_len: tokens per row, also the longest segment.
        seed: seed of the per-epoch shuffles.
        shuffle: shuffle the documents each epoch (False keeps file order: used for eval).
    """

    def __init__(self, docs: List[str], seq_len: int, seed: int = 0, shuffle: bool = True):
        if seq_len < 2:
            raise ValueError(f"{seq_len=} must be at least 2")
        self.tokens = [encode(doc) for doc in docs]
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        positions = sum(len(t) - 1 for t in self.tokens)
        self.rows_per_epoch = positions // seq_len
        if self.rows_per_epoch == 0:
            raise ValueError(f"the corpus holds {positions} positions, fewer than one row of {seq_len=}")
        self._epoch, self._epoch_data = -1, None

    @property
    def num_tokens(self) -> int:
        """Training positions in one epoch (whole rows only)."""
        return self.rows_per_epoch * self.seq_len

    def _load_epoch(self, epoch: int):
        if epoch != self._epoch:
            order = np.arange(len(self.tokens))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(order)
            docs = [self.tokens[i] for i in order]
            inputs = np.concatenate([t[:-1] for t in docs])
            targets = np.concatenate([t[1:] for t in docs])
            starts = np.cumsum([0] + [len(t) - 1 for t in docs])
            self._epoch, self._epoch_data = epoch, (inputs, targets, starts)
        return self._epoch_data

    def row(self, index: int):
        """Row ``index`` (counting across epochs): ``(inputs, targets, segment_lengths)`` as numpy."""
        epoch, r = divmod(index, self.rows_per_epoch)
        inputs, targets, starts = self._load_epoch(epoch)
        a, b = r * self.seq_len, (r + 1) * self.seq_len
        # segment edges: the row's edges plus every document start strictly inside it
        inner = starts[(starts > a) & (starts < b)]
        edges = np.concatenate([[a], inner, [b]])
        return inputs[a:b], targets[a:b], np.diff(edges)

    def batch(self, indices: Sequence[int]) -> Batch:
        """Rows ``indices`` concatenated into one packed `Batch`."""
        rows = [self.row(i) for i in indices]
        lengths = np.concatenate([seg for _, _, seg in rows])
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        inputs = np.concatenate([x for x, _, _ in rows])[None]
        targets = np.concatenate([y for _, y, _ in rows])[None]
        return Batch(mx.array(inputs), mx.array(targets), mx.array(cu))


def bucket_segments(batch: Batch) -> Batch:
    """``batch`` with ``cu_seqlens`` padded by empty segments to the next power of two of entries.

    A compiled step (``mx.compile``) is traced once per input shape; the segment count varies
    from batch to batch, so bucketing it leaves a handful of shapes to trace.  Empty segments own
    no token and change nothing.
    """
    n = batch.cu_seqlens.shape[0]
    size = 1 << (n - 1).bit_length()
    if size == n:
        return batch
    pad = mx.broadcast_to(batch.cu_seqlens[-1:], (size - n,))
    return batch._replace(cu_seqlens=mx.concatenate([batch.cu_seqlens, pad]))


def step_rows(step: int, batch_size: int, rank: int = 0, world: int = 1) -> range:
    """Row indices rank ``rank`` trains on at ``step``.

    A step's global batch is ``batch_size · world`` consecutive rows; rank ``r`` takes the
    ``r``-th block of ``batch_size``.  So one process at ``batch_size · world`` reads exactly the
    union of what ``world`` processes read.
    """
    start = (step * world + rank) * batch_size
    return range(start, start + batch_size)
