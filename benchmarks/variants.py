"""Issue 5 benchmarks: the attention variants against MLX's nearest equivalent, in one run.

    source .gpu/setup.sh && PYTHONPATH=$PWD:$PWD/.gpu/pylib:$PYTHONPATH \\
        python -m benchmarks.variants --out $OUT/variants --tests 150 --deadline 280
    python -m benchmarks.variants --small --out runs/variants      # CPU smoke run, tiny shapes

Scenarios (bf16 on a GPU; ``--small`` shrinks every shape):

- ``window``: sliding window W=256, causal, B=2 H=16 N=8192 D=64 — mfa vs SDPA given the bool mask;
- ``bias``: additive bias B=2 H=16 N=4096 D=64, full ``(B, H, N, N)`` and per-head ``(1, H, N, N)``
  — fwd+bwd *with dbias* vs the naive MLX path (the only MLX way to get dbias), forward vs SDPA
  given the additive mask (and SDPA's fwd+bwd without dbias, for scale);
- ``sparse``: block-sparse, 10% of 128x128 blocks, B=1 H=16 N=16384 D=64 — vs dense SDPA;
- ``extras``: B=2 H=16 N=4096 D=64 causal — plain mfa, with dropout 0.1, with a key-padding bias
  ``(B, 1, 1, N)`` (its dbias too), with ALiBi + sinks, next to SDPA;
- ``varlen``: 16 documents of 128–4096 tokens, causal, H=16 D=64, packed — vs SDPA on the padded
  batch with the causal mask (fused) and with a bool mask (causal & padding).

fwd+bwd computes the gradients for a cotangent of out (``mx.vjp``, `measure.vjp_step`).  TFLOP/s count
useful work only: forward ``4·H·D`` per attended (query, key) pair, fwd+bwd 3.5×.
Writes ``results.json`` / ``results.md`` as it goes; ``--tests S`` first runs
tests/test_kernels_native.py (at most S seconds, ``tests.txt``); ``--deadline S`` skips what
would start after S seconds, so a bounded run still returns what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np

from benchmarks import run as bench
from benchmarks.measure import Result, time_step, vjp_step, window_mask

SCENARIOS = ("window", "bias", "sparse", "extras", "varlen")  # the padded bool-mask baseline, the heaviest, last


class Entry:
    """One timed call: a scenario's backend in one mode, with its step and useful FLOPs."""

    def __init__(self, scenario: str, shape: str, backend: str, mode: str, step: Callable[[], list], flops: float,
                 group: str = ""):
        self.scenario, self.shape, self.backend, self.mode = scenario, shape, backend, mode
        self.step, self.flops = step, flops
        self.group = group or scenario  # rows compared with each other


def _normal(shape, dtype, seed):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def _both_modes(scenario, shape, backend, fn, arrays, dout, flops, group="", compiled=False) -> List[Entry]:
    """fwd and fwd+bwd entries of one backend; ``compiled``: also both under `mx.compile` (backend
    name + " compiled"), where a call replays its traced graph without running the Python again."""
    named = {backend: {"fwd": lambda: [fn(*arrays)], "fwd+bwd": vjp_step(fn, arrays, dout)}}
    if compiled:
        forward = mx.compile(fn)
        grads = mx.compile(lambda *xs: mx.vjp(fn, list(xs[:-1]), [xs[-1]])[1])
        named[backend + " compiled"] = {"fwd": lambda: [forward(*arrays)],
                                        "fwd+bwd": lambda: list(grads(*arrays, dout))}
    return [Entry(scenario, shape, name, m, steps[m], flops * (1.0 if m == "fwd" else 3.5), group)
            for name, steps in named.items() for m in ("fwd", "fwd+bwd")]


def window_entries(native: str, small: bool, dtype) -> List[Entry]:
    import mfa

    B, H, N, D, W = (1, 2, 256, 64, 32) if small else (2, 16, 8192, 64, 256)
    q, k, v, dout = (_normal((B, H, N, D), dtype, s) for s in range(4))
    scale = D**-0.5
    mask = window_mask(N, W)
    pairs = (W + 1) * N - W * (W + 1) // 2
    flops = 4.0 * B * H * D * pairs
    shape = f"B={B} H={H} N={N} D={D} causal window={W}"
    return (_both_modes("window", shape, "sdpa (bool mask)",
                        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask),
                        [q, k, v], dout, flops)
            + _both_modes("window", shape, f"mfa:{native}",
                          lambda q, k, v: mfa.flash_attention(q, k, v, scale=scale, causal=True, window=(W, 0),
                                                              backend=native),
                          [q, k, v], dout, flops, compiled=True))


def bias_entries(native: str, small: bool, dtype) -> List[Entry]:
    import mfa

    B, H, N, D = (1, 2, 256, 64) if small else (2, 16, 4096, 64)
    q, k, v, dout = (_normal((B, H, N, D), dtype, s) for s in range(4))
    scale = D**-0.5
    flops = 4.0 * B * H * D * N * N
    entries = []
    for bias_shape in ((B, H, N, N), (1, H, N, N)):
        bias = _normal(bias_shape, dtype, 9)
        shape = f"B={B} H={H} N={N} D={D} bias {bias_shape}"

        def naive(q, k, v, b):
            s = (q @ k.swapaxes(-1, -2)) * scale + b
            return mx.softmax(s.astype(mx.float32), axis=-1).astype(q.dtype) @ v

        entries += _both_modes("bias", shape, "naive (with dbias)", naive, [q, k, v, bias], dout, flops, shape)
        entries += _both_modes("bias", shape, f"mfa:{native} (with dbias)",
                               lambda q, k, v, b: mfa.flash_attention(q, k, v, scale=scale, bias=b, backend=native),
                               [q, k, v, bias], dout, flops, shape, compiled=bias_shape[0] == B)
        entries += _both_modes("bias", shape, "sdpa (additive mask, no dbias)",
                               lambda q, k, v, b=bias: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                                             mask=b),
                               [q, k, v], dout, flops, shape)
    return entries


def sparse_entries(native: str, small: bool, dtype) -> List[Entry]:
    import mfa

    B, H, N, D, block = (1, 2, 512, 64, 64) if small else (1, 16, 16384, 64, 128)
    q, k, v, dout = (_normal((B, H, N, D), dtype, s) for s in range(4))
    scale = D**-0.5
    nb = N // block
    rng = np.random.default_rng(0)
    blocks = np.zeros(nb * nb, bool)
    blocks[rng.choice(nb * nb, size=round(0.1 * nb * nb), replace=False)] = True
    mask = mfa.BlockMask.from_blocks(blocks.reshape(1, 1, nb, nb), block_size=block)
    shape = f"B={B} H={H} N={N} D={D} block-sparse {mask.density:.0%} of {block}x{block} blocks"
    dense = 4.0 * B * H * D * N * N
    return (_both_modes("sparse", shape, "sdpa (dense)",
                        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale),
                        [q, k, v], dout, dense * mask.density)
            + _both_modes("sparse", shape, f"mfa:{native}",
                          lambda q, k, v: mfa.flash_attention(q, k, v, scale=scale, block_mask=mask, backend=native),
                          [q, k, v], dout, dense * mask.density, compiled=True))


def varlen_entries(native: str, small: bool, dtype) -> List[Entry]:
    import mfa

    docs, lo, hi, H, D = (4, 16, 128, 2, 64) if small else (16, 128, 4096, 16, 64)
    lengths = np.random.default_rng(1).integers(lo, hi + 1, docs)
    total, longest = int(lengths.sum()), int(lengths.max())
    cu = mx.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    q, k, v, dout = (_normal((total, H, D), dtype, s) for s in range(4))
    scale = D**-0.5
    flops = 4.0 * H * D * float((lengths * (lengths + 1) // 2).sum())
    shape = f"{docs} docs of {lo}-{hi} (total {total}, longest {longest}) H={H} D={D} causal"

    # the padded batch (docs, H, longest, D) and its masks, built once outside the timed calls
    index = np.zeros((docs, longest), np.int64)
    valid = np.zeros((docs, longest), bool)
    for i, (start, n) in enumerate(zip(np.array(cu[:-1]), lengths)):
        index[i, :n] = np.arange(start, start + n)
        valid[i, :n] = True
    index, valid = mx.array(index), mx.array(valid)
    pad = lambda x: mx.where(valid[:, :, None, None], x[index], 0).transpose(0, 2, 1, 3)  # noqa: E731
    qp, kp, vp, doutp = (pad(x) for x in (q, k, v, dout))
    causal = mx.arange(longest)[None, :] <= mx.arange(longest)[:, None]
    bool_mask = (causal[None] & valid[:, None, :])[:, None]  # (docs, 1, longest, longest)
    mx.eval(qp, kp, vp, doutp, bool_mask)
    padded = f"{shape}; padded to {docs}x{longest}"
    return (_both_modes("varlen", padded, "sdpa padded (causal, fused)",
                        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"),
                        [qp, kp, vp], doutp, flops)
            + _both_modes("varlen", shape, f"mfa:{native} varlen",
                          lambda q, k, v: mfa.flash_attention_varlen(q, k, v, cu, cu, scale=scale, causal=True,
                                                                     backend=native),
                          [q, k, v], dout, flops)
            + _both_modes("varlen", padded, "sdpa padded (bool mask)",
                          lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=bool_mask),
                          [qp, kp, vp], doutp, flops))


def extras_entries(native: str, small: bool, dtype) -> List[Entry]:
    """What the other options cost on one dense causal shape, next to MLX SDPA and plain mfa."""
    import mfa

    B, H, N, D = (1, 2, 256, 64) if small else (2, 16, 4096, 64)
    q, k, v, dout = (_normal((B, H, N, D), dtype, s) for s in range(4))
    scale = D**-0.5
    flops = 4.0 * B * H * D * N * (N + 1) / 2
    shape = f"B={B} H={H} N={N} D={D} causal"
    padding = mx.where(mx.arange(N) < N - N // 8, 0.0, -mx.inf).astype(dtype).reshape(1, 1, 1, N)
    padding = mx.broadcast_to(padding, (B, 1, 1, N))
    slopes = mx.array([2.0 ** (-8 * (i + 1) / H) for i in range(H)])
    sinks = mx.zeros((H,))
    options = {
        "": {},
        " dropout 0.1": {"dropout_p": 0.1, "dropout_seed": 1},
        " key-padding bias (B, 1, 1, N)": {"bias": padding},
        " alibi + sinks": {"alibi_slopes": slopes, "sinks": sinks},
    }
    entries = _both_modes("extras", shape, "sdpa (causal)",
                          lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"),
                          [q, k, v], dout, flops)
    for name, kw in options.items():
        entries += _both_modes("extras", shape, f"mfa:{native}{name}",
                               lambda q, k, v, kw=kw: mfa.flash_attention(q, k, v, scale=scale, causal=True,
                                                                          backend=native, **kw),
                               [q, k, v], dout, flops)
    return entries


ENTRIES = {"window": window_entries, "bias": bias_entries, "sparse": sparse_entries, "extras": extras_entries,
           "varlen": varlen_entries}


def with_ratios(rows: List[Dict]) -> List[Dict]:
    """Add ``speedup`` (latency) and ``speedup_pipelined`` of every row over each baseline (sdpa*/naive*)
    of its group and mode."""
    for r in rows:
        for key, field in (("speedup", "ms"), ("speedup_pipelined", "pipelined_ms")):
            r[key] = {}
            for base in rows:
                baseline = base["backend"].startswith(("sdpa", "naive"))
                if (baseline and base["group"] == r["group"] and base["mode"] == r["mode"]
                        and base.get(field) and r.get(field)):
                    r[key][base["backend"]] = base[field] / r[field]
    return rows


def markdown(rows: List[Dict], device: str) -> str:
    lines = [f"Device: {device}; useful TFLOP/s (of the latency); speedup = baseline ms / ms.",
             "latency: one step built, run and synchronized alone; pipelined: per step, steps back to back "
             "(step i+1 built while step i runs).", "",
             "| scenario | shape | backend | mode | latency ms | TFLOP/s | pipelined ms | extra peak MiB "
             "| speedup (latency) | speedup (pipelined) |",
             "|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        head = f"| {r['scenario']} | {r['shape']} | {r['backend']} | {r['mode']} |"
        if r["error"]:
            lines.append(f"{head} {r['error']} | | | | | |")
            continue
        ups = {key: ", ".join(f"{x:.2f}× {name}" for name, x in r[key].items() if name != r["backend"])
               for key in ("speedup", "speedup_pipelined")}
        lines.append(f"{head} {r['ms']:.2f} | {r['tflops']:.3g} | {r['pipelined_ms']:.2f} | {r['peak_mib']:.0f} | "
                     f"{ups['speedup']} | {ups['speedup_pipelined']} |")
    return "\n".join(lines)


def run_tests(out: Path, seconds: int) -> int:
    """tests/test_kernels_native.py in a subprocess of at most `seconds` (8 workers where pytest-xdist is
    installed: one at a time they take longer than 150 s on an H100 host); the summary in tests.txt."""
    workers = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    cmd = [sys.executable, "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider", "--maxfail=10", *workers,
           "tests/test_kernels_native.py"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds)
        text, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        text, rc = f"{(err.stdout or b'').decode()}\nTIMEOUT after {seconds} s", 124
    (out / "tests.txt").write_text(text)
    print(text[-4000:], flush=True)
    return rc


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for results.json, results.md (and tests.txt)")
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--backend", default=None, help="mfa backend (default: the device's native target)")
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run of this script)")
    p.add_argument("--tests", type=int, default=0, help="first run the native kernel tests for at most S seconds")
    p.add_argument("--deadline", type=float, default=None, help="start nothing after S seconds from launch")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = bench.device_name()
    print(f"# issue 5 variants on {device}", flush=True)
    rc = run_tests(out, args.tests) if args.tests else 0
    native = args.backend or bench.native_target()
    dtype = mx.bfloat16 if mx.default_device().type == mx.DeviceType.gpu else mx.float32
    rows: List[Dict] = []
    for scenario in args.only.split(","):
        if args.deadline and time.perf_counter() - start > args.deadline:
            print(f"deadline: {scenario} skipped", flush=True)
            continue
        for e in ENTRIES[scenario](native, args.small, dtype):
            if args.deadline and time.perf_counter() - start > args.deadline:
                r = Result(error="skipped (deadline)")
            else:
                r = time_step(e.step, e.flops, args.warmup, args.iters)
            rows.append({"scenario": e.scenario, "shape": e.shape, "backend": e.backend, "mode": e.mode,
                         "group": e.group, "dtype": str(dtype), **vars(r)})
            shown = r.error or (f"{r.ms:.2f} ms ({r.pipelined_ms:.2f} pipelined)  {r.tflops:.3g} TFLOP/s  "
                                f"+{r.peak_mib:.0f} MiB")
            print(f"{e.scenario:7s} {e.backend:34s} {e.mode:8s} {shown}   [{e.shape}]", flush=True)
            with_ratios(rows)
            (out / "results.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
            (out / "results.md").write_text(markdown(rows, device) + "\n")
    print("\n" + markdown(rows, device))
    return rc


if __name__ == "__main__":
    sys.exit(main())
