"""Timing, memory and FLOP accounting for one attention call, for every benchmarked backend.

Backends: ``sdpa`` (`mx.fast.scaled_dot_product_attention`), ``naive`` (plain MLX ops: the
score matrix materialized in the input dtype, softmax in float32) and ``mfa:<backend>``
(`mfa.flash_attention` with ``backend=<backend>``: auto, tiled, cuda, metal, emulator, ...).
Modes: ``fwd`` (out) and ``fwd+bwd`` (dq, dk, dv for the cotangent ``dout`` of out, through
``mx.vjp``: what FlashAttention's benchmarks time as ``out.backward(dout)``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, List, Optional

import mlx.core as mx


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention shape: q ``(B, H, N, D)``, k/v ``(B, Hkv, N, D)``; ``window``: left size of a
    sliding window (keys i-window..i, with causal), or 0 for none."""

    B: int
    H: int
    Hkv: int
    N: int
    D: int
    causal: bool
    window: int = 0

    @property
    def label(self) -> str:
        gqa = f"/{self.Hkv}" if self.Hkv != self.H else ""
        win = f" window={self.window}" if self.window else ""
        return f"B={self.B} H={self.H}{gqa} N={self.N} D={self.D}{' causal' if self.causal else ''}{win}"

    def attended_fraction(self) -> float:
        """Share of the N x N (query, key) pairs that attention visits."""
        if self.window:
            w = min(self.window, self.N - 1)
            pairs = (w + 1) * self.N - w * (w + 1) // 2
            return pairs / (self.N * self.N)
        return (self.N + 1) / (2 * self.N) if self.causal else 1.0

    def flops(self, mode: str) -> float:
        """Forward: 4·B·H·N·N·D × attended fraction (two matmuls); fwd+bwd: 3.5 × forward."""
        fwd = 4.0 * self.B * self.H * self.N * self.N * self.D * self.attended_fraction()
        return fwd if mode == "fwd" else 3.5 * fwd


def window_mask(N: int, window: int) -> mx.array:
    """Bool keep-mask ``(N, N)`` of a causal sliding window: keys i - window .. i."""
    i, j = mx.arange(N)[:, None], mx.arange(N)[None, :]
    return (j <= i) & (j >= i - window)


def naive_attention(q, k, v, scale, causal, window=0):
    """Materialized attention in MLX ops: scores in the input dtype, softmax in float32."""
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        k, v = mx.repeat(k, H // Hkv, axis=1), mx.repeat(v, H // Hkv, axis=1)
    s = (q @ k.swapaxes(-1, -2)) * scale
    if window:
        s = mx.where(window_mask(q.shape[2], window), s, mx.array(-float("inf"), s.dtype))
    elif causal:
        Nq, Nk = q.shape[2], k.shape[2]
        keep = mx.arange(Nk)[None, :] <= mx.arange(Nq)[:, None] + (Nk - Nq)
        s = mx.where(keep, s, mx.array(-float("inf"), s.dtype))
    p = mx.softmax(s.astype(mx.float32), axis=-1).astype(q.dtype)
    return p @ v


def attention_fn(backend: str, case: Case, scale: float) -> Callable:
    """``(q, k, v) -> out`` for a benchmark backend name (SDPA gets a bool mask for windows)."""
    causal, window = case.causal, case.window
    if backend == "sdpa":
        mask = window_mask(case.N, window) if window else ("causal" if causal else None)
        return lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if backend == "naive":
        return lambda q, k, v: naive_attention(q, k, v, scale, causal, window)
    if backend.startswith("mfa:"):
        import mfa

        name = backend[4:]
        win = (window, 0) if window else None
        return lambda q, k, v: mfa.flash_attention(q, k, v, scale=scale, causal=causal, window=win, backend=name)
    raise ValueError(f"unknown benchmark backend {backend!r}")


def step_fn(backend: str, case: Case, mode: str, dtype) -> Callable[[], list]:
    """A closure running one timed step (fresh lazy graph, returns the arrays to evaluate)."""
    key = mx.random.key(0)
    kq, kk, kv, kd = mx.random.split(key, 4)
    q = mx.random.normal((case.B, case.H, case.N, case.D), key=kq).astype(dtype)
    k = mx.random.normal((case.B, case.Hkv, case.N, case.D), key=kk).astype(dtype)
    v = mx.random.normal((case.B, case.Hkv, case.N, case.D), key=kv).astype(dtype)
    dout = mx.random.normal(q.shape, key=kd).astype(dtype)
    mx.eval(q, k, v, dout)
    attn = attention_fn(backend, case, case.D**-0.5)
    if mode == "fwd":
        return lambda: [attn(q, k, v)]
    return vjp_step(attn, [q, k, v], dout)


def vjp_step(fn: Callable, arrays: List[mx.array], dout: mx.array) -> Callable[[], list]:
    """A step computing the gradients of ``fn(*arrays)`` with respect to every array for the
    cotangent ``dout`` (forward and backward, no loss reduction around them)."""
    return lambda: list(mx.vjp(fn, arrays, [dout])[1])


@dataclasses.dataclass
class Result:
    """``ms``: median latency of one step run alone (graph build, launch, synchronize); ``pipelined_ms``:
    time per step when steps run back to back, the host building step i+1 while the device runs step i
    (what a training loop with ``mx.async_eval`` sees, and what CUDA-event timings report)."""

    ms: Optional[float] = None
    tflops: Optional[float] = None
    peak_mib: Optional[float] = None
    pipelined_ms: Optional[float] = None
    error: str = ""


def pipelined_ms(step: Callable[[], list], iters: int) -> float:
    """Steady-state time per step with at most two in flight (step i is built and queued with
    ``mx.async_eval`` before waiting for step i-1): from the end of the first step to the end of
    the last, over the `iters` - 1 steps between, so the pipeline's fill (one step's full latency)
    is not spread over the mean."""
    iters = max(iters, 2)
    mx.synchronize()
    previous, first_done = None, None
    for _ in range(iters):
        outs = step()
        mx.async_eval(outs)
        if previous is not None:
            mx.eval(previous)
            if first_done is None:
                first_done = time.perf_counter()
        previous = outs
    mx.eval(previous)
    mx.synchronize()
    return 1e3 * (time.perf_counter() - first_done) / (iters - 1)


# time_step runs enough pipelined steps to fill about this long (as triton's do_bench repeats for
# 100 ms): short calls need that long for the GPU to reach its steady clocks and the host its pace
PIPELINE_MS = 100.0


def time_step(step: Callable[[], list], flops: float, warmup: int, iters: int) -> Result:
    """Median wall time of ``mx.eval(step())`` over `iters` runs after `warmup`, the pipelined time per
    step over ``2 * iters`` steps or as many as fill ~`PIPELINE_MS` (at most 300), and the extra peak
    memory of one run; errors (OOM, an unsupported call) are returned in the result, not raised."""
    try:
        for _ in range(warmup):
            mx.eval(step())
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(step())
        mx.synchronize()
        peak = (mx.get_peak_memory() - base) / 2**20
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            mx.eval(step())
            mx.synchronize()
            times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
        return Result(ms=ms, tflops=flops / (ms * 1e-3) / 1e12, peak_mib=peak,
                      pipelined_ms=pipelined_ms(step, max(2 * iters, min(300, math.ceil(PIPELINE_MS / ms)))))
    except Exception as err:  # OOM, an unsupported call: reported in the table, not fatal
        return Result(error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
    finally:
        mx.clear_cache()


def measure(backend: str, case: Case, mode: str, dtype, warmup: int, iters: int) -> Result:
    """Median wall time over `iters` runs after `warmup`, and the extra peak memory of one run."""
    try:
        step = step_fn(backend, case, mode, dtype)
    except Exception as err:
        return Result(error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
    return time_step(step, case.flops(mode), warmup, iters)
