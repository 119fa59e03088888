"""Forward/backward pairs registered as `mx.custom_function` VJPs, one per (spec, backend).

Every backend that mfa implements (``tiled`` and the native targets) supplies a forward
``(spec, inputs) -> (out, lse)`` (out in float32 or q's dtype; the op casts it) and a backward
``(spec, inputs, out, lse, dout, dlse) -> AttentionGrads``.  `attention_function` pairs them
into one custom function taking the present arrays of `AttentionInputs` positionally, so
``mx.grad`` never differentiates through the forward's ops and memory stays O(N).

`sdpa_forward_function` pairs MLX's fused SDPA forward (which gives no lse) with mfa's
backward: the VJP first recomputes ``lse`` with a scores-only pass.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Tuple

import mlx.core as mx

from mfa.grad import tiled_backward
from mfa.ops import tiled
from mfa.ops.spec import AttentionGrads, AttentionInputs, AttentionSpec
from mfa.settings import Settings


class Implementation(NamedTuple):
    forward: Callable[[AttentionSpec, AttentionInputs], Tuple[mx.array, mx.array]]
    backward: Callable[..., AttentionGrads]


def _native(target: str, check: bool, settings: Optional[Settings]) -> Implementation:
    from mfa import kernels

    return Implementation(
        forward=functools.partial(kernels.forward, target, check=check, settings=settings),
        backward=functools.partial(kernels.backward, target, check=check, settings=settings),
    )


def implementation(backend: str, routed: bool = False, settings: Optional[Settings] = None) -> Implementation:
    """The forward/backward pair of a fused backend name.

    Args:
        backend: ``"tiled"`` or a native target.
        routed: the router has checked each call against `mfa.kernels.unsupported_reason`, so
            the native launchers skip that check. Default: ``False``.
        settings: the ``$MFA_*`` switches the native launchers use (`mfa.settings`); None:
            they read the environment at each call.
    """
    if backend == "tiled":
        return Implementation(tiled.forward, tiled_backward.backward)
    if backend in ("metal", "cuda", "emulator"):
        return _native(backend, check=not routed, settings=settings)
    raise ValueError(f"no fused forward/backward pair for {backend=}")


@functools.lru_cache(maxsize=512)
def attention_function(spec: AttentionSpec, backend: str, backward_backend: str = "",
                       lse_used: bool = True, settings: Optional[Settings] = None) -> Callable:
    """The custom function ``(*inputs.arrays()) -> (out, lse)`` for ``spec`` on ``backend``.

    For calls the router has checked (`mfa.ops.routing.choose`).

    Args:
        spec: static options of the call.
        backend: forward (and, by default, backward) implementation.
        backward_backend: a different backend for the backward, or "" for the same.
        lse_used: whether lse reaches the caller.  When it does not, its cotangent (the zeros MLX
            passes for an unused output) is ignored, so the backward neither reads it nor makes
            MLX fill it.
        settings: the call's ``$MFA_*`` switches, for the native forward and backward.
    """
    fwd = implementation(backend, routed=True, settings=settings)
    bwd = implementation(backward_backend or backend, routed=True, settings=settings)

    @mx.custom_function
    def attention(*arrays):
        return fwd.forward(spec, AttentionInputs.from_arrays(spec, arrays))

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):
        dout, dlse = cotangents[0], cotangents[1] if lse_used else None
        out, lse = outputs
        inputs = AttentionInputs.from_arrays(spec, primals)
        return bwd.backward(spec, inputs, out, lse, dout, dlse).arrays()

    return attention


def _sdpa(spec: AttentionSpec, inputs: AttentionInputs) -> mx.array:
    return mx.fast.scaled_dot_product_attention(
        inputs.q, inputs.k, inputs.v, scale=spec.scale,
        mask="causal" if spec.causal else None, sinks=inputs.sinks,
    )


@functools.lru_cache(maxsize=512)
def sdpa_forward_function(spec: AttentionSpec, backward_backend: str, settings: Optional[Settings] = None) -> Callable:
    """Custom function ``(*inputs.arrays()) -> out``: MLX SDPA forward, mfa backward.

    For plain (dense, causal or not, optional sinks) calls that do not ask for lse: MLX's fused
    forward is fastest, but its own VJP materializes the score matrix on Metal and CPU (for
    calls the router has checked; ``settings`` as in `attention_function`).
    """
    bwd = implementation(backward_backend, routed=True, settings=settings)

    @mx.custom_function
    def attention(*arrays):
        return _sdpa(spec, AttentionInputs.from_arrays(spec, arrays))

    @attention.vjp
    def attention_vjp(primals, dout, out):
        inputs = AttentionInputs.from_arrays(spec, primals)
        lse = tiled.logsumexp(spec, inputs)
        return bwd.backward(spec, inputs, out, lse, dout, None).arrays()

    return attention


def sdpa_function(spec: AttentionSpec) -> Callable:
    """MLX's own SDPA, forward and VJP (``backend="sdpa"``)."""
    return lambda *arrays: _sdpa(spec, AttentionInputs.from_arrays(spec, arrays))
