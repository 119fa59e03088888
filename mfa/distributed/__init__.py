"""Context parallelism: attention over a sequence split across the ranks of an ``mx.distributed`` group.

Public names::

    mfa.distributed.ring_attention(q, k, v, group, causal=...)   # each rank: (B, H, N/W, D)
    mfa.distributed.shard(x, rank, world)                        # a rank's part of a full sequence
    mfa.distributed.unshard(parts) / gather(x, group)            # back to the full sequence
    mfa.distributed.positions(n_local, rank, world)              # global positions of local tokens
"""

from mfa.distributed.layout import LAYOUTS, gather, positions, shard, unshard
from mfa.distributed.ring import ring_attention

__all__ = ["LAYOUTS", "gather", "positions", "ring_attention", "shard", "unshard"]
