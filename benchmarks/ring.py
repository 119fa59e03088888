"""Context-parallel ring attention vs one device's `mfa.flash_attention`: fwd+bwd throughput and memory.

Run it twice, with the same ``--out``: once as one process (the single-device baseline, plain
`mfa.flash_attention`), once under ``mlx.launch`` (`mfa.distributed.ring_attention`, the sequence
split across the ranks in zig-zag order)::

    python benchmarks/ring.py --out runs/ring                                   # 1 GPU
    mlx.launch -n 2 --backend nccl --python "$(which python)" benchmarks/ring.py --out runs/ring
    # CPU, 2 processes, small: --backend ring ... --lengths 1024 2048 --heads 2 --dtype float32

Each run writes ``ring_w<W>.json`` and ``ring_w<W>.md`` (rank 0); the multi-process run, when the
single-device file is there, adds ``ring_summary.json``/``.md``: aggregate TFLOP/s of W devices
over the single device's TFLOP/s at the largest length it ran (``speedup``), and whether the
multi-device run reached lengths the single device could not (OOM, or ``--memory-limit-gb``).

``--transfers-only`` times just the messages of a ring fwd+bwd step (K/V to every rank, dK/dV back to
their owners) per transport, e.g. ``--comm ring all_gather`` to compare them.

Lengths are global (the whole sequence); each rank holds ``N / W`` tokens.  TFLOP/s counts the
attention math of the whole sequence: forward ``4·B·H·N²·D`` × causal fraction, fwd+bwd 3.5×.
The time of a step is the slowest rank's (median over ``--iters`` after ``--warmup``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mfa  # noqa: E402
import mfa.distributed as md  # noqa: E402
from mfa.distributed import comm as transports  # noqa: E402
from benchmarks.measure import Case  # noqa: E402
from benchmarks.run import device_name  # noqa: E402

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and Markdown results")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536],
                   help="global sequence lengths N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--causal", type=int, choices=(0, 1), default=1)
    p.add_argument("--layout", choices=md.LAYOUTS, default="zigzag")
    p.add_argument("--comm", nargs="+", default=["auto"], help="ring transports to time: auto, ring, all_gather")
    p.add_argument("--backend", default="auto", help="per-block fused backend (auto, cuda, metal, tiled)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--transfers-only", action="store_true",
                   help="time only the K/V and dK/dV transfers of a fwd+bwd step (no attention math)")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="mx.set_memory_limit per process: emulate a smaller device")
    return p.parse_args(argv)


def _barrier(group) -> None:
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))


def _slowest(seconds: float, group) -> float:
    if group.size() == 1:
        return seconds
    return float(mx.distributed.all_max(mx.array([seconds]), group=group)[0])


def _step(args, case: Case, group, comm: str) -> Callable[[], List[mx.array]]:
    """One fwd+bwd step on this rank's part of the sequence (the whole sequence when alone)."""
    world, rank = group.size(), group.rank()
    n = case.N // world
    dtype = DTYPES[args.dtype]
    keys = mx.random.split(mx.random.key(rank), 4)
    q = mx.random.normal((case.B, case.H, n, case.D), key=keys[0]).astype(dtype)
    k = mx.random.normal((case.B, case.Hkv, n, case.D), key=keys[1]).astype(dtype)
    v = mx.random.normal((case.B, case.Hkv, n, case.D), key=keys[2]).astype(dtype)
    dout = mx.random.normal(q.shape, key=keys[3]).astype(dtype)
    mx.eval(q, k, v, dout)
    if world == 1:
        def attention(q, k, v):
            return mfa.flash_attention(q, k, v, causal=case.causal, backend=args.backend)
    else:
        def attention(q, k, v):
            return md.ring_attention(q, k, v, group, causal=case.causal, layout=args.layout, comm=comm,
                                     backend=args.backend)
    grad = mx.grad(lambda q, k, v: (attention(q, k, v) * dout).astype(mx.float32).sum(), argnums=(0, 1, 2))
    return lambda: list(grad(q, k, v))


def _transfers(args, case: Case, group, comm: str) -> Callable[[], List[mx.array]]:
    """The messages of one ring fwd+bwd step alone: every K/V slice to every rank, dK/dV back."""
    n, dtype = case.N // group.size(), DTYPES[args.dtype]
    k = mx.random.normal((case.B, case.Hkv, n, case.D)).astype(dtype)
    v = mx.random.normal((case.B, case.Hkv, n, case.D)).astype(dtype)
    mx.eval(k, v)
    kind = transports.resolve(comm, group)
    scatter = kind == "all_gather" and transports.sum_scatter_supported(group)

    def step():
        touched = []
        for direction in ("forward", "backward"):
            transport = transports.Transport(kind, group, (k, v), scatter=scatter)
            for source, (ks, vs) in transport.slices():
                touched.append(ks[..., :1, :1] + vs[..., :1, :1])
                if direction == "backward":
                    transport.give_back(source, (ks.astype(mx.float32), vs.astype(mx.float32)))
        return touched + transport.owned()

    return step


def measure(args, case: Case, group, comm: str) -> Dict:
    """Median step time (slowest rank), TFLOP/s of the whole sequence, tokens/s and peak memory."""
    resolved = transports.resolve(comm, group) if group.size() > 1 else "-"
    row = {"N": case.N, "n_local": case.N // group.size(), "comm": resolved}
    try:
        step = (_transfers if args.transfers_only else _step)(args, case, group, comm)
        for _ in range(args.warmup):
            mx.eval(step())
        mx.synchronize()
        mx.reset_peak_memory()
        times = []
        for _ in range(args.iters):
            _barrier(group)
            t0 = time.perf_counter()
            mx.eval(step())
            mx.synchronize()
            times.append(_slowest(time.perf_counter() - t0, group))
        seconds = statistics.median(times)
        peak = mx.get_peak_memory() / 2**30
        if group.size() > 1:
            peak = float(mx.distributed.all_max(mx.array([peak]), group=group)[0])
        row.update(ms=1e3 * seconds, tflops=case.flops("fwd+bwd") / seconds / 1e12,
                   tokens_per_s=case.B * case.N / seconds, peak_gb=peak, error="")
    except Exception as err:  # OOM or an unsupported call: recorded, and longer lengths are skipped
        row.update(ms=None, tflops=None, tokens_per_s=None, peak_gb=None,
                   error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
    return row


def markdown(title: str, rows: List[Dict]) -> str:
    lines = [f"### {title}", "", "| N | per rank | transport | ms | TFLOP/s | tokens/s | peak GiB |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['N']} | {r['n_local']} | {r['comm']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['N']} | {r['n_local']} | {r['comm']} | {r['ms']:.1f} | {r['tflops']:.3g} | "
                         f"{r['tokens_per_s']:.4g} | {r['peak_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def summary(single: Dict, multi: Dict) -> Dict:
    """Speedup of the multi-device run over the single device at the largest length both ran."""
    ok_single = [r for r in single["rows"] if not r["error"]]
    if not ok_single:
        return {"error": "the single-device run has no successful length"}
    largest = max(ok_single, key=lambda r: r["N"])
    out = {"single_largest_N": largest["N"], "single_tflops": largest["tflops"], "world": multi["world"],
           "rows": []}
    for r in multi["rows"]:
        if r["error"]:
            continue
        out["rows"].append({"N": r["N"], "comm": r["comm"], "tflops": r["tflops"],
                            "speedup_vs_single_largest": r["tflops"] / largest["tflops"],
                            "beyond_single": r["N"] > largest["N"]})
    return out


def summary_markdown(s: Dict) -> str:
    if "error" in s:
        return f"### ring vs one device\n\n{s['error']}\n"
    lines = [f"### {s['world']} devices vs one (largest single-device length N={s['single_largest_N']}: "
             f"{s['single_tflops']:.3g} TFLOP/s)", "",
             "| N | transport | TFLOP/s | × one device | beyond one device |", "|---:|---|---:|---:|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['N']} | {r['comm']} | {r['tflops']:.3g} | {r['speedup_vs_single_largest']:.2f} | "
                     f"{'yes' if r['beyond_single'] else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict:
    args = parse_args(argv)
    group = mx.distributed.init()
    world, rank = group.size(), group.rank()
    if args.memory_limit_gb:
        mx.set_memory_limit(int(args.memory_limit_gb * 2**30))
    kv_heads = args.kv_heads or args.heads
    rows = []
    for comm in args.comm if world > 1 else ["-"]:
        for N in sorted(args.lengths):
            case = Case(args.batch, args.heads, kv_heads, N, args.head_dim, bool(args.causal))
            row = measure(args, case, group, comm)
            rows.append(row)
            if rank == 0:
                print(markdown(case.label, [row]).splitlines()[-1], flush=True)
            if row["error"]:
                break
    result = {"device": device_name(), "world": world, "layout": args.layout, "backend": args.backend,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        title = "one device: mfa.flash_attention" if world == 1 else f"{world} ranks: ring_attention ({args.layout})"
        if args.transfers_only:
            title = f"{world} ranks: transfers of ring_attention fwd+bwd only (TFLOP/s column: attention FLOPs / time)"
        (args.out / f"ring_w{world}.json").write_text(json.dumps(result, indent=1))
        (args.out / f"ring_w{world}.md").write_text(f"{result['device']}\n\n" + markdown(title, rows))
        single_path = args.out / "ring_w1.json"
        if world > 1 and single_path.exists() and not args.transfers_only:
            s = summary(json.loads(single_path.read_text()), result)
            (args.out / "ring_summary.json").write_text(json.dumps(s, indent=1))
            (args.out / "ring_summary.md").write_text(summary_markdown(s))
            print(summary_markdown(s), flush=True)
    return result


if __name__ == "__main__":
    main()
