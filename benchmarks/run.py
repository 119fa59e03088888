"""Attention benchmarks: mfa vs MLX SDPA vs naive, forward and forward+backward, on one device.

    python -m benchmarks.run                       # the default suite of this device (gpu or cpu)
    python -m benchmarks.run --suite issue4 --out runs/bench
    python -m benchmarks.run --suite cpu --device cpu   # issue 3's CPU table
    python -m benchmarks.run --backends sdpa,mfa:cuda --dims 64,128 --lengths 4096 --causal 1

Prints a Markdown table per mode and writes ``results.json`` and ``results.md`` to ``--out``.
Columns: ms (median latency of one call), pipelined ms (per call, calls back to back; see
`measure.pipelined_ms`), TFLOP/s (forward 4·B·H·N²·D × attended fraction; fwd+bwd 3.5× that),
extra peak memory over the inputs (MiB), and speed ratios (SDPA ms / ms, naive ms / ms; > 1
means faster than that baseline).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import mlx.core as mx

from benchmarks.measure import Case, measure


def native_target() -> str:
    """The mfa native target of the default device (cuda, metal), else tiled."""
    if mx.default_device().type == mx.DeviceType.gpu:
        if mx.metal.is_available():
            return "metal"
        return "cuda"
    return "tiled"


def suite(name: str) -> List[Case]:
    """Named shape sets: ``issue4`` (GPU, B·H = 32), ``window`` (issue 5), ``final`` (both),
    ``cpu`` (issue 3), ``quick``."""
    if name == "issue4":
        cases = [Case(2, 16, 16, n, d, c) for d in (64, 128) for n in (2048, 4096, 8192) for c in (True, False)]
        cases += [Case(2, 16, 16, n, d, True) for d in (80, 96, 192, 256) for n in (4096, 8192)]
        return cases
    if name == "window":  # issue 5: sliding window W=256, causal
        return [Case(2, 16, 16, 8192, 64, True, window=256)]
    if name == "final":  # largest first, so a run cut short keeps the headline shapes
        return suite("window") + sorted(suite("issue4"), key=lambda c: (-c.N, c.D not in (64, 128)))
    if name == "cpu":
        return [Case(1, 8, 8, n, 64, False) for n in (1024, 2048, 4096)]
    if name == "quick":
        return [Case(2, 16, 16, n, d, c) for d in (64, 128) for n in (1024, 4096) for c in (True, False)]
    raise ValueError(f"unknown suite {name!r}")


def device_name() -> str:
    if mx.default_device().type != mx.DeviceType.gpu:
        return f"CPU ({platform.processor() or platform.machine()}), MLX {mx.__version__}"
    if mx.metal.is_available():
        info = mx.metal.device_info()
        return f"{info.get('device_name', 'Apple GPU')}, MLX {mx.__version__}"
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        gpu = "CUDA GPU"
    return f"{gpu}, MLX {mx.__version__} (CUDA)"


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def markdown(rows: List[Dict], mode: str) -> str:
    lines = [f"### {mode}", "", "| shape | backend | ms | TFLOP/s | extra peak MiB | × SDPA | × naive "
             "| pipelined ms | × SDPA pipelined |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["mode"] != mode:
            continue
        if r["error"]:
            lines.append(f"| {r['shape']} | {r['backend']} | {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['shape']} | {r['backend']} | {fmt(r['ms'], '.2f')} | {fmt(r['tflops'], '.3g')} | "
                     f"{fmt(r['peak_mib'], '.0f')} | {fmt(r['vs_sdpa'], '.2f')} | {fmt(r['vs_naive'], '.2f')} | "
                     f"{fmt(r.get('pipelined_ms'), '.2f')} | {fmt(r.get('vs_sdpa_pipelined'), '.2f')} |")
    return "\n".join(lines)


def report(device, dtype, rows, modes, warmup, iters) -> str:
    return "\n\n".join([f"Device: {device}; dtype {dtype}; median of {iters} after {warmup} warm-up runs.",
                         *(markdown(rows, m) for m in modes)])


def save(out: Path, device, dtype, rows, modes, warmup, iters) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"device": device, "dtype": str(dtype), "rows": rows}, indent=1))
    (out / "results.md").write_text(report(device, dtype, rows, modes, warmup, iters) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["gpu", "cpu"], default=None, help="default: MLX's default device")
    p.add_argument("--suite", default=None, help="issue4 | cpu | quick (default: issue4 on GPU, cpu on CPU)")
    p.add_argument("--backends", default=None,
                   help="comma list of sdpa, naive, mfa:<backend> (default: sdpa,naive,mfa:<native or tiled>)")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--dims", default=None, help="override head dims of the suite, e.g. 64,128")
    p.add_argument("--lengths", default=None, help="override sequence lengths, e.g. 1024,4096")
    p.add_argument("--causal", default=None, help="override: 0, 1 or 0,1")
    p.add_argument("--batch-heads", default=None, help="override B,H (and Hkv: B,H,Hkv)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None, help="directory for results.json and results.md")
    args = p.parse_args(argv)

    if args.device:
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    dtype = getattr(mx, args.dtype or ("bfloat16" if on_gpu else "float32"))
    cases = suite(args.suite or ("issue4" if on_gpu else "cpu"))
    if args.dims:
        dims = [int(x) for x in args.dims.split(",")]
        cases = [dataclasses.replace(c, D=d) for c in cases for d in dims if c.D == cases[0].D]
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
        cases = [dataclasses.replace(c, N=n) for c in cases for n in lengths if c.N == cases[0].N]
    if args.causal is not None:
        flags = [bool(int(x)) for x in args.causal.split(",")]
        cases = [dataclasses.replace(c, causal=f) for c in cases for f in flags if c.causal == cases[0].causal]
    if args.batch_heads:
        bh = [int(x) for x in args.batch_heads.split(",")]
        cases = [dataclasses.replace(c, B=bh[0], H=bh[1], Hkv=bh[2] if len(bh) > 2 else bh[1]) for c in cases]
    cases = list(dict.fromkeys(cases))
    backends = (args.backends or f"sdpa,naive,mfa:{native_target()}").split(",")
    modes = args.modes.split(",")
    warmup = args.warmup if args.warmup is not None else (2 if on_gpu else 1)
    iters = args.iters if args.iters is not None else (5 if on_gpu else 2)

    device = device_name()
    print(f"# attention benchmarks on {device}, {dtype}\n", flush=True)
    out = Path(args.out) if args.out else None
    rows = []
    for case in cases:
        for mode in modes:
            results = {b: measure(b, case, mode, dtype, warmup, iters) for b in backends}
            for b, r in results.items():
                ref = {name: results[name].ms for name in ("sdpa", "naive") if name in results}
                sdpa_pipelined = results["sdpa"].pipelined_ms if "sdpa" in results else None
                row = {"shape": case.label, **dataclasses.asdict(case), "dtype": str(dtype), "backend": b, "mode": mode,
                       **dataclasses.asdict(r),
                       "vs_sdpa": ref["sdpa"] / r.ms if r.ms and ref.get("sdpa") else None,
                       "vs_naive": ref["naive"] / r.ms if r.ms and ref.get("naive") else None,
                       "vs_sdpa_pipelined": sdpa_pipelined / r.pipelined_ms if r.pipelined_ms and sdpa_pipelined
                       else None}
                rows.append(row)
                shown = r.error or f"{r.ms:.2f} ms  {r.tflops:.3g} TFLOP/s  +{r.peak_mib:.0f} MiB"
                print(f"{case.label:52s} {mode:8s} {b:12s} {shown}", flush=True)
            if out:  # written as we go: a run cut short keeps what it measured
                save(out, device, dtype, rows, modes, warmup, iters)
    print("\n" + report(device, dtype, rows, modes, warmup, iters))
    return 0


if __name__ == "__main__":
    sys.exit(main())
