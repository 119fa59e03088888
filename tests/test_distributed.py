"""Context-parallel ring attention: layouts, block plans, and 2 or 4 processes vs one.

The multi-process test launches ``mlx.launch -n 2`` (and ``-n 4``) ``--backend ring`` on
tests/distributed/ring_worker.py once for all its cases, then compares each rank's rows of out, lse, dq, dk, dv with
`mfa.flash_attention` run here on the full sequence.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import check_rule

import mfa
import mfa.distributed as md
from mfa.distributed.plan import plan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))
from cases import full_inputs, loss_and_grads  # noqa: E402
from launch import launch  # noqa: E402

BASE = dict(B=1, H=4, Hkv=2, N=64, D=16, Dv=16, dtype="float32", backend="tiled", seed=0)
CASES = [
    dict(BASE, name="causal_zigzag_ring", causal=True, layout="zigzag", comm="ring"),
    dict(BASE, name="full_zigzag_ring_dv", causal=False, layout="zigzag", comm="ring", Dv=8, seed=1),
    dict(BASE, name="causal_contiguous_ring", causal=True, layout="contiguous", comm="ring", seed=2),
    dict(BASE, name="causal_zigzag_all_gather", causal=True, layout="zigzag", comm="all_gather", seed=3),
    dict(BASE, name="full_contiguous_all_gather_mqa", causal=False, layout="contiguous", comm="all_gather",
         Hkv=1, B=2, seed=4),
    dict(BASE, name="causal_zigzag_auto_bf16", causal=True, layout="zigzag", comm="auto", dtype="bfloat16", seed=5),
    # the native kernels' bodies (CPU executor) as the per-block forward/backward
    dict(BASE, name="causal_zigzag_ring_emulator_bf16", causal=True, layout="zigzag", comm="ring", D=32, Dv=32,
         dtype="bfloat16", backend="emulator", seed=8),
]
# four ranks: K/V make several hops and dK/dV accumulators pass through ranks that do not own them
CASES_4 = [
    dict(BASE, name="causal_zigzag_ring_4", causal=True, layout="zigzag", comm="ring", seed=6),
    dict(BASE, name="causal_contiguous_all_gather_4", causal=True, layout="contiguous", comm="all_gather", seed=7),
]


# -- layouts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", md.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip_and_positions(layout, world):
    N = 8 * world
    x = mx.arange(2 * N).reshape(1, 2, N, 1)
    parts = [md.shard(x, r, world, layout=layout) for r in range(world)]
    assert mx.array_equal(md.unshard(parts, layout=layout), x)
    for r, part in enumerate(parts):
        # each local token's value is its global position (head 0)
        assert mx.array_equal(part[0, 0, :, 0], md.positions(N // world, r, world, layout=layout))


def test_zigzag_assignment():
    x = mx.arange(8).reshape(1, 1, 8, 1)
    assert md.shard(x, 0, 2).reshape(-1).tolist() == [0, 1, 6, 7]
    assert md.shard(x, 1, 2).reshape(-1).tolist() == [2, 3, 4, 5]
    assert md.shard(x, 1, 2, layout="contiguous").reshape(-1).tolist() == [4, 5, 6, 7]


def test_shard_rejects_lengths_that_do_not_split():
    with pytest.raises(ValueError, match="divisible by 4"):
        md.shard(mx.zeros((1, 1, 6, 2)), 0, 2)
    with pytest.raises(ValueError, match="layout"):
        md.shard(mx.zeros((1, 1, 8, 2)), 0, 2, layout="striped")


# -- block plans -----------------------------------------------------------------------------------


def _covered(world, n_local, causal, layout):
    """How many blocks cover each (query, key) pair of the global sequence."""
    N = world * n_local
    count = np.zeros((N, N), dtype=int)
    for r in range(world):
        qpos = np.array(md.positions(n_local, r, world, layout=layout))
        for s in range(world):
            kpos = np.array(md.positions(n_local, s, world, layout=layout))
            for block in plan(r, s, world, n_local, causal=causal, layout=layout):
                rows, cols = qpos[slice(*block.q)], kpos[slice(*block.kv)]
                assert len(rows) > 0 and len(cols) > 0
                keep = np.ones((len(rows), len(cols)), dtype=bool)
                if block.causal:
                    assert (rows == cols).all(), "a causal block covers the same positions"
                    keep = np.tril(keep)
                count[np.ix_(rows, cols)] += keep
    return count


@pytest.mark.parametrize("layout", md.LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_plan_tiles_the_global_mask_exactly_once(world, causal, layout):
    n_local = 6
    N = world * n_local
    want = np.tril(np.ones((N, N), dtype=int)) if causal else np.ones((N, N), dtype=int)
    assert (_covered(world, n_local, causal, layout) == want).all()


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_plan_is_one_call_of_equal_work_per_step(world):
    n = 16
    for r in range(world):
        for s in range(world):
            (block,) = plan(r, s, world, n, causal=True, layout="zigzag")
            rows, cols = block.q[1] - block.q[0], block.kv[1] - block.kv[0]
            work = rows * (cols + 1) / 2 if block.causal else rows * cols
            assert work == pytest.approx(n * n / 2, rel=2 / n)


# -- one process (a group of size 1) ---------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_single_process_equals_flash_attention(causal):
    case = dict(BASE, causal=causal)
    full = full_inputs(case)
    got = loss_and_grads(lambda q, k, v: md.ring_attention(q, k, v, causal=causal, return_lse=True),
                         full["q"], full["k"], full["v"], full["d_out"], full["d_lse"])
    want = _single_process(case, full)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_bad_inputs():
    q = mx.zeros((1, 4, 6, 8))
    with pytest.raises(ValueError, match="H=4 must be divisible by Hkv=3"):
        md.ring_attention(q, mx.zeros((1, 3, 6, 8)), mx.zeros((1, 3, 6, 8)))
    with pytest.raises(ValueError, match="same tokens"):
        md.ring_attention(q, mx.zeros((1, 4, 4, 8)), mx.zeros((1, 4, 4, 8)))
    with pytest.raises(ValueError, match="divisible by 2"):
        md.ring_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], causal=True)
    with pytest.raises(ValueError, match="comm must be one of"):
        md.ring_attention(q, q, q, comm="tree")
    with pytest.raises(ValueError, match="fused forward/backward backend"):
        md.ring_attention(q, q, q, backend="sdpa")


# -- two processes ---------------------------------------------------------------------------------


def _single_process(case, full):
    def attention(q, k, v):
        return mfa.flash_attention(q, k, v, causal=case["causal"], return_lse=True, backend=case["backend"])

    return loss_and_grads(attention, full["q"], full["k"], full["v"], full["d_out"], full["d_lse"])


def _launch(world, cases, tmp):
    """Per-rank results of ``cases``, from one ``mlx.launch -n world`` run."""
    (tmp / "cases.json").write_text(json.dumps(cases))
    launch(world, ROOT / "tests" / "distributed" / "ring_worker.py", [tmp / "cases.json", tmp])
    return [dict(np.load(tmp / f"rank{r}.npz")) for r in range(world)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``{world: per-rank results}`` of the 2- and 4-process runs, launched once per module."""
    return {
        2: _launch(2, CASES, tmp_path_factory.mktemp("ring2")),
        4: _launch(4, CASES_4, tmp_path_factory.mktemp("ring4")),
    }


WORLD_CASES = [(2, c) for c in CASES] + [(4, c) for c in CASES_4]


@pytest.mark.parametrize("world,case", WORLD_CASES, ids=[f"{w}ranks-{c['name']}" for w, c in WORLD_CASES])
def test_processes_equal_flash_attention_on_the_full_sequence(launched, world, case):
    full = full_inputs(case)
    want = _single_process(case, full)
    for name in ("out", "lse", "dq", "dk", "dv"):
        parts = [mx.array(launched[world][r][f"{case['name']}/{name}"]) for r in range(world)]
        got = md.unshard(parts, layout=case["layout"])
        if case["dtype"] == "float32":
            np.testing.assert_allclose(got, want[name].astype(mx.float32), rtol=1e-4, atol=1e-5, err_msg=name)
        else:
            # low precision: ring vs the float32 result within 2x single-process mfa's error (+ rounding)
            upcast = {key: x.astype(mx.float32) for key, x in full.items()}
            ref = _single_process(case, upcast)
            check_rule(name, got.astype(want[name].dtype), ref[name], want[name])
