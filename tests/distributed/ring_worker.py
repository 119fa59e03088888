"""Worker of tests/test_distributed.py, run on every rank by ``mlx.launch``.

Usage: ``ring_worker.py CASES_JSON OUT_DIR``.  For each case every rank shards the full inputs,
runs `mfa.distributed.ring_attention` forward and backward, and writes its local ``out, lse, dq,
dk, dv`` to ``OUT_DIR/rank<r>.npz`` (keys ``<case>/<name>``).
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import full_inputs, loss_and_grads  # noqa: E402

import mfa.distributed as md  # noqa: E402
from mfa.ops import tiled  # noqa: E402


def main(cases_path: str, out_dir: str) -> None:
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    cases = json.loads(Path(cases_path).read_text())
    saved = {}
    with tiled.block_sizes(8, 16):  # several tiles per block, ragged edges
        for case in cases:
            full = full_inputs(case)
            local = {name: md.shard(x, rank, world, layout=case["layout"]) for name, x in full.items()}

            def attention(q, k, v):
                return md.ring_attention(q, k, v, group, causal=case["causal"], layout=case["layout"],
                                         comm=case["comm"], backend=case["backend"], return_lse=True)

            result = loss_and_grads(attention, local["q"], local["k"], local["v"], local["d_out"], local["d_lse"])
            for name, x in result.items():
                saved[f"{case['name']}/{name}"] = np.array(x.astype(mx.float32))
    np.savez(Path(out_dir) / f"rank{rank}.npz", **saved)


if __name__ == "__main__":
    main(*sys.argv[1:])
