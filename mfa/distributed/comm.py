"""How K/V reach every rank and dK/dV return to their owners: two transports over mx.distributed.

- ``"ring"``: point-to-point.  At step ``t`` rank ``r`` holds the K/V of rank ``r - t`` and passes it
  to ``r + 1`` (``mx.distributed.send``/``recv``) while it computes, so only two K/V slices live at
  a time.  In the backward the dK/dV accumulator of a slice travels with it, each rank adding its
  part, and one last hop hands it to its owner.  Sends run on their own CPU stream and receives
  on another: one stream for both deadlocks as soon as a slice exceeds the socket buffers (both
  ranks block in ``send`` with nobody receiving), and separate streams also overlap the transfers
  with the attention math on the default stream.
- ``"all_gather"``: collective.  One ``all_gather`` brings every slice (``O(N)`` K/V per rank, as
  in Llama 3's context parallelism); the backward sums every rank's dK/dV contributions with one
  ``sum_scatter`` (or ``all_sum`` where the backend has no ``sum_scatter``).  MLX's NCCL backend
  (CUDA) has no ``send``/``recv``, so this is the transport there.

``"auto"`` picks ``all_gather`` on CUDA GPUs, else ``ring`` when the backend can send and
receive (a one-value probe), else ``all_gather``.

Message order.  Two ranks must post their sends and receives on a link in the same order, yet
MLX runs independent parts of a graph in whatever order its scheduler picks, and the graphs of
two ranks differ (each computes different blocks).  A receive has no inputs, so nothing in the
data orders, say, the backward's K/V hops against its dK/dV hops, or one layer's backward hops
against the next layer's.  Every message of this module is therefore chained, in program order,
after the previous one (`_Order`): the program order is the same on every rank, as it is for any
collective.  Other collectives of the same group running in the same evaluation are not in the
chain: on the ``ring`` backend they share its sockets, so evaluate the attention's gradients
before, e.g., averaging them with ``all_sum``.
"""

from __future__ import annotations

import functools
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx

TRANSPORTS = ("auto", "ring", "all_gather")


def pack(arrays: Sequence[mx.array]) -> mx.array:
    """One flat buffer of same-dtype arrays (one message instead of several)."""
    return mx.concatenate([a.reshape(-1) for a in arrays])


def unpack(flat: mx.array, like: Sequence[mx.array]) -> List[mx.array]:
    """Inverse of `pack`: arrays shaped like ``like``."""
    out, start = [], 0
    for a in like:
        out.append(flat[start:start + a.size].reshape(a.shape))
        start += a.size
    return out


@functools.lru_cache(maxsize=None)
def _streams() -> Tuple[mx.Stream, mx.Stream]:
    """The (send, receive) CPU streams of the ring transport, one thread each."""
    return mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)


class _Order:
    """The program order of every message this process exchanges (see the module notes)."""

    last: Optional[mx.array] = None

    @classmethod
    def after_previous(cls, x: mx.array) -> mx.array:
        """``x``, scheduled after the previous message was received."""
        return x if cls.last is None else mx.depends(x, cls.last)

    @classmethod
    def record(cls, received: mx.array) -> mx.array:
        """Make ``received`` the message the next one waits for; returns it."""
        # a fresh one-element array depending on it: once evaluated it holds no reference to the data
        cls.last = mx.depends(mx.zeros((1,)), received)
        return received


class _Exchange:
    """Neighbour exchange around the ring of a group: send to ``rank+1``, receive from ``rank-1``."""

    def __init__(self, group):
        self.group = group
        self.next = (group.rank() + 1) % group.size()
        self.prev = (group.rank() - 1) % group.size()

    def shift(self, x: mx.array) -> mx.array:
        """Send ``x`` on; return the array of the same shape and dtype from the previous rank.

        The result depends on the send as well as the receive.  Evaluation then schedules ``x``
        before anything that waits for the received data: were it queued behind such a wait on the
        compute stream, both ranks would wait for each other's data forever.
        """
        send_stream, recv_stream = _streams()
        sent = mx.distributed.send(_Order.after_previous(x), self.next, group=self.group, stream=send_stream)
        received = mx.distributed.recv_like(x, self.prev, group=self.group, stream=recv_stream)
        return _Order.record(mx.depends(received, sent))


def _all_gather(x: mx.array, group) -> mx.array:
    """``(W, *x.shape)``: every rank's ``x``, in rank order."""
    return _Order.record(mx.distributed.all_gather(_Order.after_previous(x)[None], group=group))


def _reduce_to_owner(stacked: mx.array, group, scatter: bool) -> mx.array:
    """Row ``rank`` of the sum over ranks of ``stacked (W, ...)``."""
    stacked = _Order.after_previous(stacked)
    if scatter:
        return _Order.record(mx.distributed.sum_scatter(stacked, group=group))[0]
    return _Order.record(mx.distributed.all_sum(stacked, group=group))[group.rank()]


_P2P: Dict[int, bool] = {}


def p2p_supported(group) -> bool:
    """Whether the group's backend implements send/recv (one tiny collective exchange, cached).

    Every rank of the group must call it together (it is answered by exchanging one value).
    """
    if group.size() == 1:
        return True
    if group.size() not in _P2P:
        try:
            mx.eval(_Exchange(group).shift(mx.zeros((1,))))
            _P2P[group.size()] = True
        except RuntimeError:
            _P2P[group.size()] = False
    return _P2P[group.size()]


_SCATTER: Dict[int, bool] = {}


def sum_scatter_supported(group) -> bool:
    """Whether the group's backend implements ``sum_scatter`` (collective probe, cached)."""
    if group.size() not in _SCATTER:
        try:
            mx.eval(mx.distributed.sum_scatter(mx.zeros((group.size(),)), group=group))
            _SCATTER[group.size()] = True
        except RuntimeError:
            _SCATTER[group.size()] = False
    return _SCATTER[group.size()]


def _on_cuda() -> bool:
    return (mx.default_device().type == mx.DeviceType.gpu and not mx.metal.is_available()
            and hasattr(mx, "cuda") and mx.cuda.is_available())


def resolve(transport: str, group) -> str:
    """``"ring"`` or ``"all_gather"`` for the requested transport (collective when ``"auto"``)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"comm must be one of {TRANSPORTS}, got comm={transport!r}")
    if transport == "auto":
        if _on_cuda():
            return "all_gather"  # MLX's NCCL backend has no send/recv (and NCCL collectives are fast)
        return "ring" if p2p_supported(group) else "all_gather"
    return transport


class Transport:
    """Delivers the K/V slices to this rank step by step and the dK/dV contributions to owners.

    Usage, in one direction of the computation::

        for source, (k_s, v_s) in transport.slices():      # step t: source = rank - t
            ...
            transport.give_back(source, (dk_s, dv_s))       # backward only
        dk, dv = transport.owned()                          # backward only
    """

    def __init__(self, kind: str, group, local: Sequence[mx.array], scatter: bool = False):
        self.kind, self.group, self.local = kind, group, list(local)
        self.rank, self.world = group.rank(), group.size()
        self.exchange = _Exchange(group) if kind == "ring" and self.world > 1 else None
        self.scatter = scatter
        self._travelling: Optional[List[mx.array]] = None
        self._parts: Dict[int, List[mx.array]] = {}
        self._owned: Optional[List[mx.array]] = None

    # -- K/V out ---------------------------------------------------------------------------------

    def slices(self) -> Iterator[Tuple[int, List[mx.array]]]:
        """``(source rank, its arrays)`` for steps ``t = 0 .. W-1`` (``source = rank - t``)."""
        if self.world == 1:
            yield self.rank, self.local
            return
        if self.kind == "all_gather":
            stacked = _all_gather(pack(self.local), self.group)
            for t in range(self.world):
                source = (self.rank - t) % self.world
                yield source, unpack(stacked[source], self.local)
            return
        current = self.local
        for t in range(self.world):
            source = (self.rank - t) % self.world
            # start the next hop before this step's math: the transfer overlaps it
            incoming = self.exchange.shift(pack(current)) if t < self.world - 1 else None
            yield source, current
            if incoming is not None:
                current = unpack(incoming, self.local)

    # -- dK/dV back --------------------------------------------------------------------------------

    def give_back(self, source: int, grads: Sequence[mx.array]) -> None:
        """This rank's contribution to the gradients of ``source``'s arrays (call once per step, in order).

        On the ring the contribution joins the accumulator that arrived with the slice and moves on
        to the next rank; after the last step it lands at its owner.
        """
        grads = list(grads)
        if self.world == 1:
            self._owned = grads
            return
        if self.kind == "all_gather":
            self._parts[source] = grads
            return
        if self._travelling is not None:
            grads = [g + a for g, a in zip(grads, unpack(self._travelling, grads))]
        incoming = self.exchange.shift(pack(grads))
        if source == (self.rank + 1) % self.world:  # last step: what arrived is our own total
            self._owned = unpack(incoming, grads)
        else:
            self._travelling = incoming

    def owned(self) -> List[mx.array]:
        """The summed gradients of this rank's own arrays."""
        if self.kind == "all_gather" and self.world > 1:
            like = self._parts[self.rank]
            stacked = mx.stack([pack(self._parts[s]) for s in range(self.world)])
            return unpack(_reduce_to_owner(stacked, self.group, self.scatter), like)
        return self._owned
