"""Backend choice and dispatch.

``backend="auto"`` picks, in order:

1. ``sdpa`` — `mx.fast.scaled_dot_product_attention` with MLX's own VJP — for plain dense calls
   (causal or not, optional sinks, no lse) where MLX runs fused forward *and* backward (CUDA
   cuDNN: fp16/bf16, D, Dv <= 128 and multiples of 8, Nq a multiple of 128), or where the score
   matrix is small enough that materializing it is cheapest;
2. ``sdpa+<mfa backward>`` — MLX's fused forward with mfa's O(N) backward, for plain calls on
   Metal, whose SDPA forward is fused but whose VJP is not;
3. a native fused kernel (``cuda`` / ``metal``) when it supports the call;
4. ``tiled`` — correct everywhere, O(N) memory.

``deterministic=True`` (a backward that gives the same bits on every run) drops the routes that
sum gradients with atomic adds: cuDNN's SDPA backward (MLX builds it without cuDNN's deterministic
option) and the native calls that `mfa.kernels.atomic_adds` names; those go to the next route.

``MFA_BACKEND=<name>`` replaces ``"auto"``; ``MFA_LOG=1`` prints which backend ran and why (the
``$MFA_*`` switches are read once per call, `mfa.settings`).
A GPU target whose kernels fail to build or run (probed once) falls back to ``tiled`` with one warning.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from typing import Callable, Optional, Tuple

import mlx.core as mx

from mfa import kernels
from mfa.grad import function
from mfa.ops.spec import AttentionInputs, AttentionSpec
from mfa.settings import Settings, read as read_settings

SMALL_SCORES = 1 << 20  # B·H·Nq·Nk below which materializing the scores is cheapest
NATIVE_TARGETS = ("metal", "cuda", "emulator")


@dataclasses.dataclass(frozen=True)
class Route:
    backend: str
    reason: str
    backward: str = ""  # for "sdpa+": the backend of the backward


def _gpu_kind() -> Optional[str]:
    """"cuda" or "metal" when the default device is a GPU of that kind, else None."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    return "cuda" if hasattr(mx, "cuda") and mx.cuda.is_available() else None


def _sdpa_reason_not(spec: AttentionSpec, inputs: AttentionInputs, return_lse: bool) -> Optional[str]:
    """Why MLX SDPA cannot compute this call exactly (None when it can)."""
    if return_lse:
        return "MLX SDPA returns no lse"
    if not (spec.is_plain or _only_sinks(spec)):
        return "options beyond causal/sinks"
    Nq, Nk = inputs.q.shape[2], inputs.k.shape[2]
    if Nk == 0:
        return "no keys"
    if spec.causal and Nq > Nk:
        return "causal with Nq > Nk leaves rows empty, which MLX SDPA does not zero"
    return None


def _only_sinks(spec: AttentionSpec) -> bool:
    return spec.has_sinks and dataclasses.replace(spec, has_sinks=False).is_plain


def _cudnn_fused(inputs: AttentionInputs) -> bool:
    q, v = inputs.q, inputs.v
    D, Dv, Nq = q.shape[3], v.shape[3], q.shape[2]
    return (
        q.dtype in (mx.float16, mx.bfloat16)
        and D % 8 == 0 and Dv % 8 == 0 and D <= 128 and Dv <= 128
        and Nq % 128 == 0
    )


def _cudnn_backward(gpu: Optional[str], inputs: AttentionInputs) -> bool:
    """Whether MLX's SDPA differentiates this call with cuDNN's fused backward on `gpu` (a
    `_gpu_kind`), which MLX builds without cuDNN's deterministic option (its dq may differ in
    the last bits from run to run)."""
    return gpu == "cuda" and _cudnn_fused(inputs)


def _metal_fused(inputs: AttentionInputs) -> bool:
    D, Dv = inputs.q.shape[3], inputs.v.shape[3]
    return D == Dv and D in (64, 72, 80, 96, 128)


def _native_reason_not(target: str, spec: AttentionSpec, inputs: AttentionInputs, deterministic: bool,
                       settings: Settings) -> Optional[str]:
    if not kernels.is_available(target):
        return f"{target} kernels are not available on this machine"
    why = kernels.unsupported_reason(target, spec, inputs, settings)
    if why is None and deterministic:
        atomics = kernels.atomic_adds(target, spec, inputs, settings)
        why = None if atomics is None else f"deterministic=True, but {atomics}"
    return why


@functools.lru_cache(maxsize=None)
def native_build_error(target: str) -> Optional[str]:
    """Build and run one tiny native call on ``target`` once; the error text if that fails.

    GPU kernels compile when first evaluated, too late for the call that triggered them to fall
    back, so ``auto`` probes each GPU target once before routing to it.
    """
    try:
        q = mx.random.normal((1, 1, 16, 64), key=mx.random.key(0)).astype(mx.float16)
        mx.eval(kernels.forward(target, AttentionSpec(scale=0.125, causal=True), AttentionInputs(q, q, q)))
        return None
    except Exception as err:  # any failure of the toolchain or the device: use tiled instead
        warnings.warn(f"mfa: {target} kernels failed to build or run ({err}); auto falls back to tiled", stacklevel=2)
        return str(err)


def choose(requested: str, spec: AttentionSpec, inputs: AttentionInputs, return_lse: bool,
           deterministic: bool = False, settings: Optional[Settings] = None) -> Route:
    """Resolve ``requested`` (a backend name or "auto") to the route that runs; with
    ``deterministic``, one whose backward sums no gradient with atomic adds (an explicit backend
    that would raises NotImplementedError).  ``settings``: the call's ``$MFA_*`` switches (None
    reads them now; a deterministic call's carry ``deterministic``, which the kernels' backward
    reads)."""
    settings = (settings or read_settings())._replace(deterministic=deterministic)
    if requested == "auto":
        requested = settings.backend
    if requested in NATIVE_TARGETS:
        why = _native_reason_not(requested, spec, inputs, deterministic, settings)
        if why is not None:
            raise NotImplementedError(f"backend={requested!r} cannot run this call: {why}")
        return _requested(requested)
    if requested == "sdpa":
        why = _sdpa_reason_not(spec, inputs, return_lse)
        if why is None and deterministic and _cudnn_backward(_gpu_kind(), inputs):
            why = "deterministic=True, but MLX builds cuDNN's SDPA backward without cuDNN's deterministic option"
        if why is not None:
            raise NotImplementedError(f"backend='sdpa' cannot run this call: {why}")
        return _requested("sdpa")
    if requested in ("reference", "tiled"):
        return _requested(requested)
    if requested != "auto":
        raise ValueError(f"unknown backend {requested!r}")
    return _auto(spec, inputs, return_lse, deterministic, settings)


@functools.cache
def _requested(backend: str) -> Route:
    return Route(backend, "requested")


def _auto(spec: AttentionSpec, inputs: AttentionInputs, return_lse: bool, deterministic: bool,
          settings: Settings) -> Route:
    gpu = _gpu_kind()
    native_ok = (
        gpu is not None and _native_reason_not(gpu, spec, inputs, deterministic, settings) is None
        and native_build_error(gpu) is None
    )
    backward = gpu if native_ok else "tiled"
    if _sdpa_reason_not(spec, inputs, return_lse) is None:
        B, H, Nq, _ = inputs.q.shape
        cudnn = _cudnn_backward(gpu, inputs)  # MLX's VJP would run cuDNN's backward
        if cudnn and not spec.has_sinks and not deterministic:
            return Route("sdpa", "cuDNN runs fused forward and backward")
        if gpu == "metal" and _metal_fused(inputs):
            return Route("sdpa+", "fused Metal SDPA forward, mfa O(N) backward", backward)
        if B * H * Nq * inputs.k.shape[2] <= SMALL_SCORES and not (cudnn and deterministic):
            return Route("sdpa", "small score matrix: materialized SDPA is fastest")
    if native_ok:
        return Route(gpu, "native fused kernel")
    return Route("tiled", "portable tiled path")


def _log(route: Route, settings: Settings) -> None:
    if settings.log:
        extra = f" (backward: {route.backward})" if route.backward else ""
        print(f"mfa: backend={route.backend}{extra}: {route.reason}", file=sys.stderr)


def _run(route: Route, spec: AttentionSpec, inputs: AttentionInputs, return_lse: bool,
         settings: Settings) -> Tuple[mx.array, Optional[mx.array]]:
    arrays = inputs.arrays()
    if route.backend == "sdpa":
        return function.sdpa_function(spec)(*arrays), None
    if route.backend == "sdpa+":
        return function.sdpa_forward_function(spec, route.backward, settings)(*arrays), None
    if route.backend in NATIVE_TARGETS and spec.varlen:
        # varlen's q, k, v are transposed views: one row-contiguous copy each, shared by the
        # forward and backward kernels (a kernel copies a strided input itself, per launch).  Not
        # done for dense calls, whose layout is unknown here: on contiguous inputs the extra
        # nodes cost ~40 µs of graph building (H100 host, window fwd+bwd)
        arrays = (*(kernels.attention.row_contiguous(x) for x in arrays[:3]), *arrays[3:])
    out, lse = function.attention_function(spec, route.backend, lse_used=return_lse, settings=settings)(*arrays)
    return out.astype(inputs.q.dtype), lse


def attend(
    spec: AttentionSpec,
    inputs: AttentionInputs,
    *,
    return_lse: bool,
    backend: str,
    reference: Callable[[], Tuple[mx.array, mx.array]],
    deterministic: bool = False,
) -> Tuple[mx.array, Optional[mx.array]]:
    """Run one checked attention call on the chosen backend: ``(out, lse or None)``.

    Args:
        spec, inputs: the checked call (dense layout).
        return_lse: whether the caller needs lse (some routes cannot give it).
        backend: the requested backend name.
        reference: computes the call with the naive oracle (``backend="reference"``).
        deterministic: route only to a backward without atomic adds (see `choose`).
    """
    settings = read_settings()._replace(deterministic=bool(deterministic))
    route = choose(backend, spec, inputs, return_lse, deterministic, settings)
    _log(route, settings)
    if route.backend == "reference":
        out, lse = reference()
        return out.astype(inputs.q.dtype), lse
    return _run(route, spec, inputs, return_lse, settings)
