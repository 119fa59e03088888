"""Host-side cost of one native-path mfa call: the Python + MLX graph building, no device work.

    python -m benchmarks.host_overhead --iters 50
    python -m benchmarks.host_overhead --iters 50 --profile window-fwd+bwd     # cProfile one case

Runs on any machine: the CUDA kernel objects are replaced by `mfa.kernels.offline._Recorder`
(which returns lazy zeros) and the CUDA target is declared available, so each call builds the
same lazy graph as on an H100 (routing, checks, launch arguments, the custom VJP) without
evaluating it.  Prints the median µs per call of each case (best of ``--rounds``), forward alone and forward+backward
under ``mx.grad`` (B=2, H=16, D=64, bf16; N=8192, and N=4096 for the bias, which must stay
under 2^31 elements).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import pstats
import statistics
import time
from typing import Callable, Dict

import mlx.core as mx
import numpy as np

import mfa
from mfa.kernels import build, offline


@contextlib.contextmanager
def recorded_cuda():
    """Stand in recorders for the CUDA kernels (one per kernel object, as `build.kernel` caches)."""
    real_kernel, real_available = build.kernel, build.is_available
    calls: list = []
    build.kernel = functools.cache(lambda target, name, arch, *_: offline._Recorder(name, calls))
    build.is_available = lambda target: True
    try:
        yield calls
    finally:
        build.kernel, build.is_available = real_kernel, real_available


def cases(B: int = 2, H: int = 16, N: int = 8192, D: int = 64) -> Dict[str, Callable[[], object]]:
    """``{name: step}``: each step builds one call's lazy graph and returns it."""
    q, k, v, dout = (mx.zeros((B, H, N, D), mx.bfloat16) for _ in range(4))
    Nb = N // 2
    qb, kb, vb, doutb = (mx.zeros((B, H, Nb, D), mx.bfloat16) for _ in range(4))
    bias = mx.zeros((B, H, Nb, Nb), mx.bfloat16)
    n = N // 128
    band = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) <= 2
    block_mask = mfa.BlockMask.from_blocks((band & np.tri(n, dtype=bool))[None, None], 128)
    options = {
        "window": (dict(causal=True, window=(256, 0)), (q, k, v, dout)),
        "bias": (dict(causal=True, bias=bias), (qb, kb, vb, doutb)),
        "block_mask": (dict(block_mask=block_mask), (q, k, v, dout)),
    }
    steps = {}
    for name, (kwargs, (q_, k_, v_, dout_)) in options.items():
        attend = functools.partial(mfa.flash_attention, backend="cuda", **kwargs)
        loss = lambda q, k, v, attend=attend, dout=dout_: (attend(q, k, v) * dout).astype(mx.float32).sum()  # noqa: E731
        grad = mx.grad(loss, argnums=(0, 1, 2))
        steps[f"{name}-fwd"] = functools.partial(attend, q_, k_, v_)
        steps[f"{name}-fwd+bwd"] = functools.partial(grad, q_, k_, v_)
    return steps


def median_us(step: Callable[[], object], iters: int, rounds: int) -> float:
    """The lowest over ``rounds`` of the median time of ``iters`` calls (other processes only add time)."""
    step()  # first call: builds the cached kernels, custom functions and schedules
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return min(medians) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=50, help="timed calls per case (default 50)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --iters calls; the best median counts")
    parser.add_argument("--profile", default="", help="cProfile this case instead of timing all")
    args = parser.parse_args()
    with recorded_cuda():
        steps = cases()
        if args.profile:
            step = steps[args.profile]
            step()
            profile = cProfile.Profile()
            profile.runcall(lambda: [step() for _ in range(args.iters)])
            pstats.Stats(profile).sort_stats("tottime").print_stats(40)
            return
        print(f"{'case':<22}{'µs / call':>10}")
        for name, step in steps.items():
            print(f"{name:<22}{median_us(step, args.iters, args.rounds):>10.1f}")


if __name__ == "__main__":
    main()
