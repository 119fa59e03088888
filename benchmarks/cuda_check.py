"""One command for the GPU machine: native-kernel tests, optional tile tuning, benchmarks.

    source .gpu/setup.sh && PYTHONPATH=$PWD:$PWD/.gpu/pylib:$PYTHONPATH \
        python -m benchmarks.cuda_check --out $OUT/cuda [--tune] [--suite issue4]

Everything runs in one process, so each kernel is compiled by NVRTC once (MLX keeps custom
kernels in memory only).  Writes ``tests.txt`` (pytest summary of tests/test_kernels_native.py),
``tune.json`` (kernel-only times per tile variant) and ``bench/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from benchmarks import run as bench

TUNE_VARIANTS = {
    "fwd": ["128x64x4x2", "128x32x4x2", "64x64x4x2"],
    "bwd": ["dq=64x64x4x2,dkdv=64x64x4x2", "dq=64x64x4x2,dkdv=64x64x4x1", "dq=64x64x4x2,dkdv=32x64x4x2",
            "dq=64x32x4x2,dkdv=64x64x4x2"],
}


def run_tests(out: Path, extra) -> int:
    import pytest

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = pytest.main(["-q", "--tb=short", "-p", "no:cacheprovider", "--maxfail=8",
                          "tests/test_kernels_native.py", *extra])
    text = buf.getvalue()
    (out / "tests.txt").write_text(text)
    print(text[-6000:], flush=True)
    return int(rc)


def time_ms(fn, warmup=2, iters=5):
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def tune(out: Path) -> None:
    from mfa.kernels import attention
    from mfa.ops.spec import AttentionInputs, AttentionSpec

    rows = []
    B, H, N, D = 2, 16, 4096, 128
    k1, k2, k3 = mx.random.split(mx.random.key(0), 3)
    q = mx.random.normal((B, H, N, D), key=k1).astype(mx.bfloat16)
    k = mx.random.normal((B, H, N, D), key=k2).astype(mx.bfloat16)
    v = mx.random.normal((B, H, N, D), key=k3).astype(mx.bfloat16)
    mx.eval(q, k, v)
    inputs = AttentionInputs(q, k, v)
    for causal in (False, True):
        spec = AttentionSpec(scale=D**-0.5, causal=causal)
        frac = 0.5 if causal else 1.0
        flops = 4.0 * B * H * N * N * D * frac
        for variant in TUNE_VARIANTS["fwd"]:
            os.environ["MFA_BLOCKS"] = f"fwd={variant}"
            try:
                ms = time_ms(lambda: attention.forward("cuda", spec, inputs))
                rows.append({"kernel": "fwd", "variant": variant, "causal": causal, "ms": ms,
                             "tflops": flops / ms / 1e9})
            except Exception as err:
                rows.append({"kernel": "fwd", "variant": variant, "causal": causal, "error": str(err)[:300]})
            print(rows[-1], flush=True)
        os.environ["MFA_BLOCKS"] = ""
        o, l = attention.forward("cuda", spec, inputs)
        mx.eval(o, l)
        for variant in TUNE_VARIANTS["bwd"]:
            os.environ["MFA_BLOCKS"] = variant
            try:
                ms = time_ms(lambda: attention.backward("cuda", spec, inputs, o, l, o, None).arrays())
                rows.append({"kernel": "bwd", "variant": variant, "causal": causal, "ms": ms,
                             "tflops": 2.5 * flops / ms / 1e9})
            except Exception as err:
                rows.append({"kernel": "bwd", "variant": variant, "causal": causal, "error": str(err)[:300]})
            print(rows[-1], flush=True)
    os.environ["MFA_BLOCKS"] = ""
    (out / "tune.json").write_text(json.dumps(rows, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tune", action="store_true", help="time tile variants of the kernels (D=128, N=4096)")
    p.add_argument("--no-tests", action="store_true")
    p.add_argument("--suite", default="quick", help="benchmark suite (quick | issue4), or 'none'")
    p.add_argument("--bench-args", default="", help="extra arguments for benchmarks.run, space separated")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(bench.device_name(), flush=True)
    rc = 0 if args.no_tests else run_tests(out, [])
    if args.tune:
        tune(out)
    if args.suite != "none":
        bench.main(["--suite", args.suite, "--backends", "sdpa,naive,mfa:cuda", "--out", str(out / "bench"),
                    *args.bench_args.split()])
    return rc


if __name__ == "__main__":
    sys.exit(main())
