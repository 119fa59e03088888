"""Where the time of an mfa call goes: host graph building, each kernel, and the kernels' resources.

    source .gpu/setup.sh && PYTHONPATH=$PWD:$PWD/.gpu/pylib:$PYTHONPATH \\
        python -m benchmarks.profile --only window,bias --steps 10        # wall-time breakdown
    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \\
        python -m benchmarks.profile --only window --steps 1 --ncu         # every kernel's duration
    python -m benchmarks.profile --only window --resources                 # nvcc -Xptxas -v per kernel

The scenarios are the mfa rows of `benchmarks.variants` (fwd and fwd+bwd).  The breakdown prints,
per row: the median wall time of ``mx.eval(step())``, the host time to build the lazy graph
(``step()`` alone), the time of the same step with the graph built ahead (device work plus
launches), and the time per step when steps run back to back (`measure.pipelined_ms`).  ``--ncu``
brackets the timed steps with cudaProfilerStart/Stop so that ncu sees only them.  ``--resources``
records the CUDA launches of each row without running them and compiles each instantiation with
nvcc, printing registers, spills and shared memory.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

from benchmarks import run as bench
from benchmarks.measure import pipelined_ms
from benchmarks import variants


def _cudart():
    """The CUDA runtime MLX loaded (for cudaProfilerStart/Stop), or None."""
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _median_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def breakdown(entry: variants.Entry, steps: int, ncu: bool) -> dict:
    """Wall, host-build and prebuilt-graph times of one entry (after one warm-up step)."""
    mx.eval(entry.step())
    mx.synchronize()
    cudart = _cudart() if ncu else None
    if cudart is not None:
        cudart.cudaProfilerStart()
    wall = _median_ms(lambda: (mx.eval(entry.step()), mx.synchronize()), steps)
    if cudart is not None:
        cudart.cudaProfilerStop()
    build = _median_ms(entry.step, steps)
    graphs = [entry.step() for _ in range(steps)]
    device = _median_ms(lambda: (mx.eval(graphs.pop()), mx.synchronize()), steps)
    return {"wall_ms": wall, "build_ms": build, "prebuilt_ms": device, "pipelined_ms": pipelined_ms(entry.step, steps)}


def resources(entry: variants.Entry) -> List[str]:
    """``name: registers, spills, shared`` of every CUDA kernel instantiation the entry launches."""
    from mfa.kernels import offline

    calls = offline.record_cuda_launches(entry.step)
    seen, functions = set(), []
    for i, (name, template, ins, outs) in enumerate(calls):
        key = (name, str(template), str(ins), str(outs))
        if key in seen:
            continue
        seen.add(key)
        functions.append(offline.cuda_kernel_source(name, template, ins, outs, function_name=f"{name}_{i}"))
    stub = Path(offline.__file__).parent / "metal" / "stub"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.cu"
        path.write_text(offline.cuda_translation_unit(functions))
        cmd = ["nvcc", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-c", "-Xptxas", "-v",
               "-o", str(Path(tmp) / "k.o"), "-I", str(stub), str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return [f"nvcc failed: {done.stderr[-2000:]}"]
    lines = []
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", done.stderr):
        m = re.search(r"Compiling entry function '(\w+)'", block)
        regs = re.search(r"Used (\d+) registers", block)
        if not (m and regs):
            continue
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        smem = re.search(r"(\d+) bytes smem", block)
        fn = re.search(r"_Z\w*?\d+(attention_\w+?_\d+)", m.group(1))
        lines.append(f"{fn.group(1) if fn else m.group(1)}: {regs.group(1)} registers, "
                     f"spills {spill.group(1) if spill else '?'}/{spill.group(2) if spill else '?'} B, "
                     f"static smem {smem.group(1) if smem else 0} B")
    templates = {f"{c[0]}_{i}": dict((k, str(v)) for k, v in c[1]) for i, c in enumerate(calls)}
    for name, t in templates.items():
        lines.append(f"  {name}: " + " ".join(f"{k}={v}" for k, v in t.items() if k not in ("T",)))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="window", help=f"comma list of {', '.join(variants.SCENARIOS)}")
    p.add_argument("--match", default="mfa", help="rows whose backend starts with this")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--small", action="store_true")
    p.add_argument("--ncu", action="store_true", help="bracket the timed steps with cudaProfilerStart/Stop")
    p.add_argument("--resources", action="store_true", help="nvcc -Xptxas -v of every launched kernel")
    args = p.parse_args(argv)
    native = bench.native_target() if not args.resources else "cuda"
    dtype = mx.bfloat16 if args.resources or mx.default_device().type == mx.DeviceType.gpu else mx.float32
    modes = args.modes.split(",")
    print(f"# profile on {bench.device_name()}", flush=True)
    for scenario in args.only.split(","):
        for e in variants.ENTRIES[scenario](native, args.small, dtype):
            if not e.backend.startswith(args.match) or e.mode not in modes:
                continue
            print(f"\n{e.scenario} | {e.backend} | {e.mode} | {e.shape}", flush=True)
            if args.resources:
                if shutil.which("nvcc") is None:
                    print("  nvcc not found")
                    return 1
                print("\n".join("  " + line for line in resources(e)), flush=True)
                continue
            r = breakdown(e, args.steps, args.ncu)
            print(f"  wall {r['wall_ms']:.3f} ms | host build {r['build_ms']:.3f} ms | "
                  f"prebuilt graph {r['prebuilt_ms']:.3f} ms | pipelined {r['pipelined_ms']:.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
