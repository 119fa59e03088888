"""Tile sweep: the mfa rows of `benchmarks.variants` scenarios under several ``$MFA_BLOCKS`` values, in one process.

    source .gpu/setup.sh && PYTHONPATH=$PWD:$PYTHONPATH python -m benchmarks.sweep --out $OUT/sweep \\
        --case "sparse=,fwd=64x128x4x2,dq=64x128x4x2x3" --case "bias=,dkdv=64x64x4x2x3"

Each ``--case scenario=override,override,...`` lists ``$MFA_BLOCKS`` values (``,`` separates kernels
inside one value only when joined by ``+``: ``fwd=64x128x4x2+dq=64x128x4x2``; the empty value is the
default tiles); an item ``bwd=<form>`` sets ``$MFA_BWD`` instead (``bwd=fused+dkdv=128x128x8x2``;
``auto`` where a value has none).  Every value is timed on the scenario's plain mfa rows (not the
compiled ones), fwd and fwd+bwd, as the pipelined time per step (`measure.pipelined_ms`, over
``--seconds`` of calls) after a warm-up that also compiles the kernels.  Prints one line per (value,
mode) and writes ``sweep.json``.  mfa reads ``$MFA_BLOCKS`` and ``$MFA_BWD`` at each call, so one
process serves every value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

from benchmarks import run as bench
from benchmarks import variants
from benchmarks.measure import pipelined_ms


def _pipelined(step, seconds: float) -> float:
    """Pipelined ms per step over about `seconds` of back-to-back calls (after two warm-up steps)."""
    for _ in range(2):
        mx.eval(step())
    t0 = time.perf_counter()
    mx.eval(step())
    mx.synchronize()
    one = max(time.perf_counter() - t0, 1e-5)
    iters = max(5, min(400, int(seconds / one)))
    return pipelined_ms(step, iters)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--case", action="append", required=True, help="scenario=value,value,... (see above)")
    p.add_argument("--seconds", type=float, default=0.3)
    p.add_argument("--repeat", type=int, default=2, help="rounds over all values (the spread is the noise)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    native = bench.native_target()
    dtype = mx.bfloat16 if mx.default_device().type == mx.DeviceType.gpu else mx.float32
    rows = []
    for case in args.case:
        scenario, _, values = case.partition("=")
        entries = [e for e in variants.ENTRIES[scenario](native, False, dtype)
                   if e.backend.startswith("mfa") and not e.backend.endswith("compiled")]
        for round_ in range(args.repeat):
            for value in values.split(","):
                items = value.split("+")
                os.environ["MFA_BLOCKS"] = ",".join(i for i in items if not i.startswith("bwd="))
                os.environ["MFA_BWD"] = next((i[4:] for i in items if i.startswith("bwd=")), "auto")
                for e in entries:
                    try:
                        ms = _pipelined(e.step, args.seconds)
                        shown = f"{ms:.3f} ms"
                    except Exception as err:  # an override that does not build: recorded, not fatal
                        ms, shown = None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                    rows.append({"scenario": scenario, "shape": e.shape, "backend": e.backend, "mode": e.mode,
                                 "blocks": value or "default", "round": round_, "pipelined_ms": ms})
                    print(f"{scenario:7s} {value or 'default':34s} {e.backend[:28]:28s} {e.mode:8s} {shown}",
                          flush=True)
                (out / "sweep.json").write_text(json.dumps({"device": bench.device_name(), "rows": rows}, indent=1))
    os.environ.pop("MFA_BLOCKS", None)
    os.environ.pop("MFA_BWD", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
