"""The native kernel bodies run by the CPU executor, against the float32 oracle.

Every test runs both fragment families of the tile layer: ``metal`` (simdgroup 8x8 matrices,
what Apple GPUs run) and ``cuda`` (mma.sync m16n8k16 + ldmatrix + cp.async, and wgmma on swizzled
B tiles wherever 4-warp groups of 16-row warps allow it: what the H100 runs), through the router's
interface `mfa.kernels.forward` / `backward`.  Checked: out, lse, dq, dk, dv and the gradients of
bias, ALiBi slopes and sinks, with a random cotangent for out *and* lse, under the suite's
tolerance rule.  Shapes span several kernel tiles of each family (Metal tiles are 32 rows or
fewer, CUDA's 64 or 128) so that tile skipping, edge masks, the varlen tile schedule and the
block-sparse lists all take part.
"""

import mlx.core as mx
import numpy as np
import pytest
from conftest import check_rule, random_qkv

import mfa
from mfa import BlockMask, kernels
from mfa.kernels import attention, offline, sources, sparse
from mfa.ops import dropout, routing
from mfa.ops.reference import attention_reference, attention_reference_varlen
from mfa.ops.spec import AttentionInputs, AttentionSpec

pytestmark = pytest.mark.skipif(not kernels.is_available("emulator"), reason="no C++ compiler")


@pytest.fixture(params=["metal", "cuda"])
def arch(request, monkeypatch):
    monkeypatch.setenv("MFA_EMULATOR_ARCH", request.param)
    return request.param


def default_dtype(arch):
    return mx.float32 if arch == "metal" else mx.bfloat16  # the CUDA family has no fp32 operands


def cu_seqlens(lengths):
    return mx.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def check(q, k, v, causal=False, *, target="emulator", scale=None, window=None, softcap=None, bias=None,
          slopes=None, sinks=None, block_mask=None, dropout_p=0.0, dropout_seed=0, lengths=None, seed=3):
    """Compare the kernels with the oracle on one call; returns the kernels' results.

    Dense calls take q ``(B, H, Nq, D)``, k, v ``(B, Hkv, Nk, D|Dv)``; varlen calls pass
    ``lengths=(lengths_q, lengths_k)`` and q, k, v in the packed dense layout ``(1, H, total, D)``.
    ``bias`` is 4-D; slopes and sinks as in `mfa.flash_attention(_varlen)`.
    """
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    k1, k2 = mx.random.split(mx.random.key(seed))
    dout = mx.random.normal(q.shape[:3] + (v.shape[3],), key=k1)
    dlse = mx.random.normal(q.shape[:3], key=k2) * 0.5
    options = dict(causal=causal, window=window, softcap=softcap, dropout_p=dropout_p, dropout_seed=dropout_seed)
    cu_q = cu_k = None
    if lengths is not None:
        cu_q, cu_k = cu_seqlens(lengths[0]), cu_seqlens(lengths[1])
    spec = AttentionSpec(scale=scale, has_bias=bias is not None, has_alibi=slopes is not None,
                         has_sinks=sinks is not None, block_mask=block_mask, varlen=lengths is not None, **options)
    inputs = AttentionInputs(q, k, v, bias, slopes, sinks, cu_q, cu_k)
    assert kernels.unsupported_reason(target, spec, inputs) is None
    out, lse = kernels.forward(target, spec, inputs)
    finite = mx.isfinite(lse)
    dlse = mx.where(finite, dlse, 0.0)
    grads = kernels.backward(target, spec, inputs, out, lse, dout.astype(q.dtype), dlse)
    extras = {name: x for name, x in (("bias", bias), ("slopes", slopes), ("sinks", sinks)) if x is not None}
    got = {"out": out, "lse": lse, "dq": grads.dq, "dk": grads.dk, "dv": grads.dv}
    got.update({f"d{name}": g for name, g in (("bias", grads.dbias), ("slopes", grads.dalibi_slopes),
                                               ("sinks", grads.dsinks)) if name in extras})

    def oracle(upcast, arrays):
        def f(q, k, v, *xs):
            named = dict(zip(extras, xs))
            kw = dict(scale=scale, softcap=softcap, sinks=named.get("sinks"), alibi_slopes=named.get("slopes"),
                      causal=causal, window=window, dropout_p=dropout_p, dropout_seed=dropout_seed, upcast=upcast)
            if lengths is None:
                return attention_reference(q, k, v, bias=named.get("bias"), block_mask=block_mask, **kw)
            packed = [x[0].transpose(1, 0, 2) for x in (q, k, v)]
            o, l = attention_reference_varlen(*packed, cu_q, cu_k, **kw)
            return o.transpose(1, 0, 2)[None], l[None]

        (o, l), g = mx.vjp(f, arrays, [dout.astype(arrays[0].dtype), dlse])
        return {"out": o, "lse": l, **dict(zip(["dq", "dk", "dv", *[f"d{n}" for n in extras]], g))}

    ref = oracle(True, [x.astype(mx.float32) for x in (q, k, v)] + list(extras.values()))
    naive = oracle(False, [q, k, v] + list(extras.values()))
    for name in got:
        assert got[name].shape == ref[name].shape, name
        check_rule(name, got[name], ref[name], naive[name])
    for name, x in [("dq", q), ("dk", k), ("dv", v), *[(f"d{n}", x) for n, x in extras.items()]]:
        assert got[name].dtype == x.dtype, name
    return got


# -- dense attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", [(1, 1), (1, 70), (17, 97), (97, 17), (130, 67)])
def test_lengths_and_causal(arch, causal, Nq, Nk):
    q, k, v = random_qkv(1, 2, 2, Nq, Nk, 64, dtype=default_dtype(arch), seed=Nq + 7 * Nk)
    check(q, k, v, causal)


@pytest.mark.parametrize("D,Dv", [(16, 16), (80, 80), (96, 96), (128, 128), (192, 192), (256, 256), (64, 32),
                                  (32, 80)])
def test_head_dims(arch, D, Dv):
    # float32 tiles of D > 128 exceed Metal's 32 KB of threadgroup memory: half precision there
    dtype = mx.float16 if arch == "metal" and max(D, Dv) > 128 else default_dtype(arch)
    q, k, v = random_qkv(1, 2, 1, 33, 40, D, Dv, dtype=dtype, seed=D + Dv)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_dtypes(arch, dtype):
    if arch == "cuda" and dtype == mx.float32:
        q, k, v = random_qkv(1, 1, 1, 8, 8, 64, dtype=dtype)
        reason = kernels.unsupported_reason("emulator", AttentionSpec(scale=0.125), AttentionInputs(q, k, v))
        assert "float32" in reason
        return
    q, k, v = random_qkv(2, 2, 2, 45, 37, 64, dtype=dtype, seed=11)
    check(q, k, v, causal=False)


@pytest.mark.parametrize("H,Hkv", [(4, 2), (6, 1)])
def test_gqa_without_repeating_kv(arch, H, Hkv):
    q, k, v = random_qkv(2, H, Hkv, 29, 51, 64, dtype=default_dtype(arch), seed=H * 10 + Hkv)
    check(q, k, v, causal=True, scale=0.3)


@pytest.mark.parametrize("window", [(0, 0), (5, 3), (20, -1), (-1, 7)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", [(90, 90), (40, 130), (130, 40)])
def test_sliding_window_visits_only_band_tiles(arch, window, causal, Nq, Nk):
    q, k, v = random_qkv(1, 2, 1, Nq, Nk, 64, dtype=default_dtype(arch), seed=Nq + Nk + window[0])
    check(q, k, v, causal, window=window)


@pytest.mark.parametrize("softcap,window", [(1.5, None), (30.0, (9, 4))])
def test_softcap(arch, softcap, window):
    q, k, v = random_qkv(2, 2, 1, 37, 61, 64, dtype=default_dtype(arch), seed=int(softcap))
    check(q * 2, k * 2, v, causal=True, window=window, softcap=softcap)


@pytest.mark.parametrize("slopes_shape,with_sinks", [((3,), False), ((1, 3), True), ((2, 3), False), (None, True)])
def test_alibi_and_sinks_with_their_gradients(arch, slopes_shape, with_sinks):
    q, k, v = random_qkv(2, 3, 1, 45, 29, 64, dtype=default_dtype(arch), seed=21)
    slopes = None if slopes_shape is None else mx.random.uniform(0.05, 0.5, slopes_shape, key=mx.random.key(4))
    sinks = mx.array([0.5, -1.0, 2.0]) if with_sinks else None
    check(q, k, v, True, scale=0.2, window=(20, -1), slopes=slopes, sinks=sinks)


def test_rows_with_no_key_give_zero_and_minus_inf(arch):
    # causal with Nq > Nk: the first Nq - Nk query rows see no key at all
    q, k, v = random_qkv(1, 2, 2, 40, 9, 64, dtype=default_dtype(arch), seed=5)
    got = check(q, k, v, causal=True)
    assert np.all(np.array(got["out"][:, :, :31].astype(mx.float32)) == 0)
    assert np.all(np.isneginf(np.array(got["lse"][:, :, :31])))
    assert np.all(np.array(got["dq"][:, :, :31].astype(mx.float32)) == 0)
    for name in ("dq", "dk", "dv"):
        assert np.isfinite(np.array(got[name].astype(mx.float32))).all()


# -- additive bias and dbias ----------------------------------------------------------------------

# (bias shape, dbias mode, one writer per entry): per element (dq kernel), per query row (dq),
# per key (dk/dv kernel), one scalar (dk/dv), each with plain stores or atomic adds
BIASES = [
    ((2, 4, 70, 90), attention.DBIAS_ELEMENTS, True),
    ((1, 4, 70, 90), attention.DBIAS_ELEMENTS, False),
    ((2, 4, 70, 1), attention.DBIAS_ROWS, True),
    ((2, 1, 70, 1), attention.DBIAS_ROWS, False),
    ((2, 4, 1, 90), attention.DBIAS_KEYS, True),
    ((1, 1, 1, 90), attention.DBIAS_KEYS, False),
    ((1, 4, 1, 1), attention.DBIAS_SCALAR, False),
]


@pytest.mark.parametrize("shape,mode,unique", BIASES)
def test_bias_and_its_gradient_in_every_broadcast(arch, shape, mode, unique):
    layout = attention.BiasLayout.of(shape, 2, 4, 2, 70, 90)
    assert (layout.mode, layout.unique) == (mode, unique)
    dtype = default_dtype(arch)
    q, k, v = random_qkv(2, 4, 2, 70, 90, 64, dtype=dtype, seed=sum(shape))
    bias = mx.random.normal(shape, key=mx.random.key(len(shape))).astype(dtype)
    check(q, k, v, True, window=(40, 5), bias=bias)


def staged_bias_flags(fn):
    """BIAS_TILE of each attention kernel that ``fn()`` launches (recorded, not run)."""
    return {name: dict(template)["BIAS_TILE"] for name, template, _, _ in offline.record_cuda_launches(fn)
            if name != "attention_bwd_preprocess"}


@pytest.mark.parametrize("shape", [(2, 4, 70, 88), (1, 4, 70, 88)])
@pytest.mark.parametrize("causal,window", [(False, None), (True, (40, 5))])
@pytest.mark.parametrize("form", ["auto", "split"])
def test_staged_bias_tiles_and_row_by_row_dbias(arch, monkeypatch, shape, causal, window, form):
    """A bias with every row and key in whole 16-byte rows comes through shared memory (BIAS_TILE) in
    every kernel, partial edge tiles included, and dbias is written (or atomically added) row by row:
    by the dq kernel, or (a full bias, $MFA_BWD=auto) by the dk/dv kernel, with dq a matmul of it."""
    monkeypatch.setenv("MFA_BWD", form)
    dtype = default_dtype(arch)
    q, k, v = random_qkv(2, 4, 2, 70, 88, 64, dtype=dtype, seed=shape[0] + 3 * causal)
    bias = mx.random.normal(shape, key=mx.random.key(shape[0])).astype(dtype)
    spec = AttentionSpec(scale=0.125, causal=causal, window=window, has_bias=True)
    inputs = AttentionInputs(q, k, v, bias, None, None, None, None)

    def launches():
        out, lse = attention.forward("emulator", spec, inputs)
        attention.backward("emulator", spec, inputs, out, lse, out, None)

    expected = {"attention_fwd": 1, "attention_bwd_dkdv": 1}
    if form == "split" or shape[0] == 1:
        expected["attention_bwd_dq"] = 1
    assert staged_bias_flags(launches) == expected
    check(q, k, v, causal, scale=0.125, window=window, bias=bias)


BIAS_LEAD_CASES = {
    "full bias, causal window": dict(shape=(2, 4, 150, 328), causal=True, window=(200, 20)),
    "full bias, split backward": dict(shape=(2, 4, 150, 328), form="split"),
    "per-head bias, batch loop": dict(shape=(1, 4, 150, 328)),
    "block-sparse": dict(shape=(2, 4, 150, 328), block_mask=True),
}


@pytest.mark.parametrize("copies", ["at_wait", "early"])
@pytest.mark.parametrize("case", sorted(BIAS_LEAD_CASES))
def test_bias_tiles_copied_ahead_of_the_others(arch, monkeypatch, case, copies):
    """`Tiles.bias_lead` (BIAS_LEAD): each kernel copies its staged bias tiles 1-3 tiles (work items
    in dk/dv) ahead of the rest, through a ring of STAGES + BIAS_LEAD tiles, and every gradient still
    matches the oracle: with copies landing at their wait (a tile waited for too late is stale) or at
    their issue (a slot refilled while still read is overwritten), over rings longer than a row's
    tiles, band-skipped tiles, block-sparse lists and the dq kernel's batch loop."""
    kw = dict(BIAS_LEAD_CASES[case])
    shape, form = kw.pop("shape"), kw.pop("form", "auto")
    monkeypatch.setenv("MFA_BWD", form)
    monkeypatch.setenv("MFA_EMU_COPIES", copies)
    # CUDA family: 64 x 64 tiles of 2 stages; Metal family: 32 x 32 tiles of 1 stage, in float16
    # (float32 rings do not fit its 32 KB)
    tiles = "64x64x4x2x0x{}" if arch == "cuda" else "32x32x4x1x0x{}"
    monkeypatch.setenv("MFA_BLOCKS", f"fwd={tiles.format(1)},dq={tiles.format(2)},dkdv={tiles.format(3)}")
    dtype = mx.bfloat16 if arch == "cuda" else mx.float16
    B, H, Nq, Nk = 2, 4, shape[2], shape[3]
    q, k, v = random_qkv(B, H, 2, Nq, Nk, 64, dtype=dtype, seed=len(case))
    bias = mx.random.normal(shape, key=mx.random.key(shape[0])).astype(dtype)
    if kw.pop("block_mask", False):
        kw["block_mask"] = BlockMask.from_mask_mod(lambda b, h, i, j: (i // 32 + j // 32 + h) % 3 != 1, 1, H, Nq, Nk,
                                                   block_size=32 if arch == "metal" else 64)
    spec = AttentionSpec(scale=0.125, has_bias=True, causal=kw.get("causal", False), window=kw.get("window"),
                         block_mask=kw.get("block_mask"))
    inputs = AttentionInputs(q, k, v, bias, None, None, None, None)

    def launches():
        out, lse = attention.forward("emulator", spec, inputs)
        attention.backward("emulator", spec, inputs, out, lse, out, None)

    leads = {name: dict(template)["BIAS_LEAD"] for name, template, _, _ in offline.record_cuda_launches(launches)
             if name != "attention_bwd_preprocess"}
    expected = {"attention_fwd": 1, "attention_bwd_dkdv": 3}
    if form == "split" or shape[0] == 1:
        expected["attention_bwd_dq"] = 2
    assert leads == expected
    check(q, k, v, scale=0.125, bias=bias, **kw)


def test_bias_lead_gives_way_where_its_ring_does_not_fit(monkeypatch):
    """At D = 256 the dk/dv kernel's ring of 2 + 3 bias tiles exceeds 227 KB: it keeps its staged
    tiles without the lead (BIAS_LEAD 0) rather than reading the bias per element; the forward's
    ring fits and keeps its lead (recorded, not run)."""
    monkeypatch.setenv("MFA_EMULATOR_ARCH", "cuda")
    monkeypatch.setenv("MFA_BLOCKS", "fwd=64x64x4x2x0x3,dkdv=64x64x4x2x0x3")
    q, k, v = random_qkv(1, 2, 2, 128, 128, 256, dtype=mx.bfloat16)
    spec = AttentionSpec(scale=0.0625, has_bias=True)
    inputs = AttentionInputs(q, k, v, mx.zeros((1, 2, 128, 128), mx.bfloat16), None, None, None, None)

    def launches():
        out, lse = attention.forward("emulator", spec, inputs)
        attention.backward("emulator", spec, inputs, out, lse, out, None)

    staged = {name: (dict(t)["BIAS_TILE"], dict(t)["BIAS_LEAD"], dict(t)["SMEM"])
              for name, t, _, _ in offline.record_cuda_launches(launches) if name != "attention_bwd_preprocess"}
    assert {name: tile_and_lead for name, (*tile_and_lead, _) in staged.items()} == {
        "attention_fwd": [1, 3], "attention_bwd_dkdv": [1, 0]}
    assert all(smem <= attention.SHARED_LIMIT["cuda"] for *_, smem in staged.values())


@pytest.mark.parametrize("case", ["per-batch block mask", "dense"])
def test_batch_shared_bias_sums_dbias_in_place(arch, case):
    """A bias (1, H, Nq, Nk) with B = 3: each dq threadgroup runs the 3 batch rows in turn and sums
    their dS into its dbias entries (no atomic adds), over per-batch block-sparse lists too (dbias
    zero-filled, entries visited in some rows only)."""
    layout = attention.BiasLayout.of((1, 4, 70, 90), 3, 4, 2, 70, 90)
    assert layout.batch_summed and not layout.unique
    dtype = default_dtype(arch)
    q, k, v = random_qkv(3, 4, 2, 70, 90, 64, dtype=dtype, seed=13)
    bias = mx.random.normal((1, 4, 70, 90), key=mx.random.key(14)).astype(dtype)
    kw = {}
    if case == "per-batch block mask":
        kw["block_mask"] = BlockMask.from_mask_mod(lambda b, h, i, j: (i // 16 + j // 16 + b) % 3 != 1, 3, 1, 70, 90,
                                                   block_size=16)
    check(q, k, v, False, bias=bias, **kw)


def dbias_owners(spec, inputs):
    """The DBIAS template value of each backward kernel that one backward launches (recorded, not run)."""
    def run():
        out, lse = attention.forward("emulator", spec, inputs)
        attention.backward("emulator", spec, inputs, out, lse, out, None)

    return {name: dict(template)["DBIAS"] for name, template, _, _ in offline.record_cuda_launches(run)
            if name in ("attention_bwd_dq", "attention_bwd_dkdv")}


DQ_FROM_DBIAS_CASES = {
    "gqa causal, rows of -inf": dict(causal=True, minus_inf_row=True),
    "window dropout sinks": dict(causal=True, window=(30, 4), dropout_p=0.2, dropout_seed=3, sinks=True),
    "block-sparse": dict(block_mask=True),
    "staged, non-causal": dict(causal=False, Nk=88),
}


@pytest.mark.parametrize("case", sorted(DQ_FROM_DBIAS_CASES))
def test_dq_from_dbias(arch, case):
    """A full bias (B, H, Nq, Nk): the dk/dv kernel writes dbias (DBIAS 1, per element or staged)
    and dq = scale · dbias·k is a matmul, no dq kernel; every gradient matches the oracle (with
    tiles skipped: dbias zero-filled there), and lse's cotangent enters through delta."""
    kw = dict(DQ_FROM_DBIAS_CASES[case])
    dtype = default_dtype(arch)
    Nk = kw.pop("Nk", 90)
    q, k, v = random_qkv(2, 4, 2, 70, Nk, 64, dtype=dtype, seed=Nk + len(case))
    bias = mx.random.normal((2, 4, 70, Nk), key=mx.random.key(9))
    if kw.pop("minus_inf_row", False):
        bias[:, :, 5] = -mx.inf
    bias = bias.astype(dtype)
    sinks = mx.random.normal((4,), key=mx.random.key(8)) if kw.pop("sinks", False) else None
    if kw.pop("block_mask", False):
        kw["block_mask"] = BlockMask.from_mask_mod(lambda b, h, i, j: (i // 16 + j // 16) % 3 != 1, 1, 1, 70, Nk,
                                                   block_size=16)
    spec = AttentionSpec(scale=64**-0.5, causal=kw.get("causal", False), window=kw.get("window"), has_bias=True,
                         has_sinks=sinks is not None, block_mask=kw.get("block_mask"),
                         dropout_p=kw.get("dropout_p", 0.0), dropout_seed=kw.get("dropout_seed", 0))
    inputs = AttentionInputs(q, k, v, bias, None, sinks, None, None)
    assert dbias_owners(spec, inputs) == {"attention_bwd_dkdv": attention.DBIAS_ELEMENTS}
    got = check(q, k, v, kw.pop("causal", False), scale=64**-0.5, bias=bias, sinks=sinks, **kw)
    assert np.isfinite(np.array(got["dbias"].astype(mx.float32))).all()


@pytest.mark.parametrize("form", ["split", "auto"])
def test_dq_kernel_keeps_dbias_where_dq_is_not_its_matmul(form, monkeypatch):
    """The dq kernel writes a per-element dbias where dS is not dbias·k's factor (softcap, ALiBi),
    where dbias is reduced (a bias broadcast over batch), where the dtypes differ, or under
    $MFA_BWD=split."""
    monkeypatch.setenv("MFA_BWD", form)
    q, k, v = random_qkv(2, 4, 2, 70, 90, 64, dtype=mx.bfloat16, seed=1)
    full = mx.zeros((2, 4, 70, 90), mx.bfloat16)
    calls = [(AttentionSpec(scale=0.125, has_bias=True, softcap=5.0), full, None),
             (AttentionSpec(scale=0.125, has_bias=True, has_alibi=True), full, mx.full((4,), 0.1)),
             (AttentionSpec(scale=0.125, has_bias=True), full[:1], None),
             (AttentionSpec(scale=0.125, has_bias=True), full.astype(mx.float32), None)]
    if form == "split":
        calls.append((AttentionSpec(scale=0.125, has_bias=True), full, None))
    for spec, bias, slopes in calls:
        inputs = AttentionInputs(q, k, v, bias, slopes, None, None, None)
        assert dbias_owners(spec, inputs) == {"attention_bwd_dq": attention.DBIAS_ELEMENTS,
                                              "attention_bwd_dkdv": 0}, (spec, bias.shape, bias.dtype)


@pytest.mark.parametrize("shape,slopes_shape,staged", [((1, 4, 45, 70), (2, 4), False), ((2, 4, 45, 72), (4,), True)])
def test_bias_with_minus_inf_entries_and_everything_else(arch, shape, slopes_shape, staged):
    """bias + GQA + causal/window + softcap + ALiBi + sinks + dropout, with whole rows masked by -inf;
    read per element (70 keys: rows are not whole 16-byte chunks) and staged (BIAS_TILE, 72 keys)."""
    dtype = default_dtype(arch)
    Nk = shape[3]
    q, k, v = random_qkv(2, 4, 2, 45, Nk, 64, 32, dtype=dtype, seed=Nk)
    bias = mx.random.normal(shape, key=mx.random.key(1))
    bias = mx.where(mx.random.uniform(shape=bias.shape, key=mx.random.key(2)) < 0.2, -mx.inf, bias)
    bias[:, :, 3 + 2 * staged] = -mx.inf
    layout = attention.BiasLayout.of(shape, 2, 4, 2, 45, Nk)
    assert attention.bias_tiles(AttentionSpec(scale=0.2, has_bias=True),
                                AttentionInputs(q, k, v, bias, None, None, None, None), layout) == staged
    slopes = mx.random.uniform(0.01, 0.2, slopes_shape, key=mx.random.key(3))
    sinks = mx.random.normal((4,), key=mx.random.key(4))
    got = check(q * 2, k * 2, v, True, scale=0.2, window=(20, 3), softcap=8.0, bias=bias.astype(dtype),
                slopes=slopes, sinks=sinks, dropout_p=0.2, dropout_seed=7)
    assert np.isfinite(np.array(got["dbias"].astype(mx.float32))).all()


# -- varlen ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("lengths_q,lengths_k,causal,window", [
    ([70, 0, 5, 130], [70, 0, 5, 130], True, None),
    ([3, 90, 0, 41], [60, 20, 9, 0], False, (15, 4)),
    ([0, 0, 40], [0, 12, 40], True, (-1, 0)),
])
def test_varlen_one_launch_over_all_sequences(arch, lengths_q, lengths_k, causal, window):
    H, Hkv = 4, 2
    q, k, v = random_qkv(1, H, Hkv, sum(lengths_q), sum(lengths_k), 64, dtype=default_dtype(arch),
                         seed=len(lengths_q) + sum(lengths_q))
    check(q, k, v, causal, window=window, lengths=(lengths_q, lengths_k))


@pytest.mark.parametrize("slopes_shape", [(4,), (4, 4)])
def test_varlen_alibi_per_sequence_sinks_dropout(arch, slopes_shape):
    lengths_q, lengths_k = [6, 0, 79, 13], [9, 4, 79, 0]
    q, k, v = random_qkv(1, 4, 2, sum(lengths_q), sum(lengths_k), 64, dtype=default_dtype(arch), seed=2)
    slopes = mx.random.uniform(0.05, 0.3, slopes_shape, key=mx.random.key(1))
    sinks = mx.random.normal((4,), key=mx.random.key(2))
    check(q, k, v, True, window=(30, 0), softcap=6.0, slopes=slopes, sinks=sinks, dropout_p=0.25, dropout_seed=3,
          lengths=(lengths_q, lengths_k))


# -- block-sparse ---------------------------------------------------------------------------------

DOC = mx.array(np.repeat(np.arange(4), [30, 7, 63, 30]).astype(np.int32))
MASK_MODS = {
    "document_causal": lambda b, h, i, j: (DOC[i] == DOC[j]) & (j <= i),
    "per_head_band": lambda b, h, i, j: (j <= i + h * 9) & (j >= i - 40),
    "per_batch_dilated": lambda b, h, i, j: (j % (b + 2) == 0) | (j < 10),
}


@pytest.mark.parametrize("name,block_size", [("document_causal", 16), ("per_head_band", (32, 128)),
                                             ("per_batch_dilated", 64)])
def test_block_sparse_mask_mod(arch, name, block_size):
    """Kernel tiles larger, equal or smaller than the mask's blocks; partial tiles take their bits."""
    N = 130
    q, k, v = random_qkv(2, 4, 2, N, N, 64, dtype=default_dtype(arch), seed=len(name))
    mask = BlockMask.from_mask_mod(MASK_MODS[name], 2, 4, N, N, block_size=block_size)
    check(q, k, v, block_mask=mask)


def test_block_sparse_128_blocks_take_128_wide_backward_tiles(monkeypatch):
    """CUDA family, mask blocks of 128 x 128: the dk/dv kernel walks 128-row query tiles (one mask
    block per work item), partial blocks included, and matches the oracle; $MFA_BLOCKS's dkdv
    tiles replace them."""
    monkeypatch.setenv("MFA_EMULATOR_ARCH", "cuda")
    monkeypatch.delenv("MFA_BLOCKS", raising=False)
    N = 300
    q, k, v = random_qkv(1, 2, 1, N, N, 64, dtype=mx.bfloat16, seed=4)
    mask = BlockMask.from_mask_mod(lambda b, h, i, j: (j <= i) & ((i // 128 + j // 128 + h) % 3 != 1), 1, 2, N, N)
    spec = AttentionSpec(scale=0.125, block_mask=mask)
    blocks = attention.block_sizes("emulator", 64, mx.bfloat16)
    dq_tiles, dkdv_tiles = attention.backward_tiles("emulator", spec, blocks)
    assert (dq_tiles.block_q, dq_tiles.block_k, dkdv_tiles.block_q, dkdv_tiles.block_k) == (64, 64, 128, 64)
    check(q, k, v, block_mask=mask)
    monkeypatch.setenv("MFA_BLOCKS", "dkdv=64x64x4x2")
    assert attention.backward_tiles("emulator", spec, attention.block_sizes("emulator", 64, mx.bfloat16))[1] == \
        kernels.Tiles(64, 64, 4, 2)
    monkeypatch.setenv("MFA_BLOCKS", "dq=64x64x4x2")  # the dk/dv rule holds where dkdv is not set
    assert attention.backward_tiles("emulator", spec, attention.block_sizes("emulator", 64, mx.bfloat16))[1] == \
        kernels.Tiles(128, 64, 4, 2)


def test_block_sparse_from_blocks_with_causal_window_bias_dropout(arch):
    q, k, v = random_qkv(1, 4, 2, 100, 150, 64, dtype=default_dtype(arch), seed=3)
    blocks = np.random.default_rng(0).random((1, 4, 4, 5)) > 0.5
    blocks[0, 0, 0] = False  # rows with no block at all: out 0, lse -inf
    mask = BlockMask.from_blocks(blocks, block_size=32)
    bias = mx.random.normal((1, 1, 1, 150), key=mx.random.key(5)).astype(q.dtype)
    got = check(q, k, v, True, window=(70, -1), block_mask=mask, bias=bias, dropout_p=0.1, dropout_seed=4)
    assert np.all(np.isneginf(np.array(got["lse"][0, 0, :32])))


def test_block_sparse_schedule_lists_and_bits():
    """The compiled lists visit exactly the active tiles; partial tiles carry the element mask; each
    (batch, head)'s tiles are ordered by decreasing list length."""
    N, bs = 75, 16
    mask = BlockMask.from_mask_mod(lambda b, h, i, j: ((j <= i) & (j % 5 != 0)) | (i < 8 + h), 1, 2, N, N,
                                  block_size=bs)
    BQ, BK = 32, 64
    s = sparse.schedule(mask, N, N, BQ, BK, sparse.UNBOUNDED, sparse.UNBOUNDED, 2, transposed=False)
    sched, bits = np.array(s.sched), np.array(s.bits)
    nqt, nkt = 3, 2
    offsets = sched[: 2 * nqt + 1]
    entries = sched[2 * nqt + 1: 2 * nqt + 1 + 2 * offsets[-1]].reshape(-1, 2)
    order = sched[2 * nqt + 1 + 2 * offsets[-1]:].reshape(2, nqt)
    lengths = np.diff(offsets).reshape(2, nqt)
    for h in range(2):
        assert sorted(order[h]) == list(range(nqt))
        assert list(lengths[h][order[h]]) == sorted(lengths[h], reverse=True)
    dense = np.array(mask.dense_mask(N, N))[0]  # (2, N, N)
    active = set()
    for h in range(2):
        for tq in range(nqt):
            row = entries[offsets[h * nqt + tq]: offsets[h * nqt + tq + 1]]
            rows = slice(tq * BQ, min(tq * BQ + BQ, N))
            expected = [tk for tk in range(nkt) if dense[h, rows, tk * BK: tk * BK + BK].any()]
            assert list(row[:, 0]) == expected
            active |= {(h, tq, tk) for tk in expected}
            for tk, p in row:
                tile = dense[h, rows, tk * BK: tk * BK + BK]
                if p < 0:
                    assert tile.all()
                    continue
                words = bits.reshape(-1, BQ, 2)[p]
                got = (words[:, :, None] >> np.arange(32)) & 1
                np.testing.assert_array_equal(got.reshape(BQ, 64)[: tile.shape[0], : tile.shape[1]], tile)
    # dk/dv lists: per key tile (one key/value head serving both heads), (head, query tile) pairs
    t = sparse.schedule(mask, N, N, BQ, BK, sparse.UNBOUNDED, sparse.UNBOUNDED, 2, transposed=True)
    tsched = np.array(t.sched)
    toffsets = tsched[: nkt + 1]
    tentries = tsched[nkt + 1: nkt + 1 + 3 * toffsets[-1]].reshape(-1, 3)
    torder = tsched[nkt + 1 + 3 * toffsets[-1]:]
    assert list(np.diff(toffsets)[torder]) == sorted(np.diff(toffsets), reverse=True)
    for tk in range(nkt):
        got = [tuple(e[:2]) for e in tentries[toffsets[tk]: toffsets[tk + 1]]]
        assert got == [(h, tq) for h in range(2) for tq in range(nqt) if (h, tq, tk) in active]


# -- dropout --------------------------------------------------------------------------------------

def test_dropout_mask_is_the_counter_hash_bit_for_bit(arch):
    """With q = 0 every weight is 1/N and v = I, so out[i, j] = keep_ij / (N (1 - p))."""
    H, N, p, seed = 2, 64, 0.3, 2**31 + 11
    dtype = mx.float16 if arch == "cuda" else mx.float32
    q = mx.zeros((2, H, N, 16), dtype)
    k = mx.random.normal((2, H, N, 16)).astype(dtype)
    v = mx.broadcast_to(mx.eye(N)[None, None], (2, H, N, N)).astype(dtype)
    spec = AttentionSpec(scale=0.25, dropout_p=p, dropout_seed=seed)
    out, _ = kernels.forward("emulator", spec, AttentionInputs(q, k, v))
    head = mx.arange(2 * H).reshape(2, H, 1, 1)
    expected = dropout.keep_mask(seed, p, head, mx.arange(N).reshape(-1, 1), mx.arange(N).reshape(1, -1))
    np.testing.assert_array_equal(np.array(out) > 0, np.array(expected))


@pytest.mark.parametrize("causal,form", [(False, "auto"), (True, "auto"), (True, "split")])
def test_dropout_gradients_regenerate_the_mask(arch, causal, form, monkeypatch):
    """Both backward forms (on the CUDA family auto is the fused one here, `fuses_by_default`)."""
    monkeypatch.setenv("MFA_BWD", form)
    q, k, v = random_qkv(2, 4, 4, 70, 90, 64, dtype=default_dtype(arch), seed=4)
    check(q, k, v, causal, dropout_p=0.25, dropout_seed=1234)


@pytest.mark.parametrize("deterministic", [False, True])
def test_dropout_backward_is_fused_by_default_on_cuda(arch, deterministic, monkeypatch):
    """$MFA_BWD=auto: a dropout call's backward (D <= 64, no GQA) hashes its mask once, in the fused
    dk/dv kernel, on the CUDA family; on Metal, for deterministic=True (no atomic adds), at D = 128
    and with GQA, the dq kernel runs."""
    monkeypatch.setenv("MFA_BWD", "auto")

    def launches(Hkv, D):
        q, k, v = random_qkv(2, 4, Hkv, 70, 90, D, dtype=mx.float16, seed=3)

        def run():
            mx.vjp(lambda q: mfa.flash_attention(q, k, v, dropout_p=0.2, dropout_seed=1, backend="emulator",
                                                 deterministic=deterministic), [q], [q])

        return {name: dict(template).get("FUSED_DQ") for name, template, _, _ in offline.record_cuda_launches(run)}

    fused = arch == "cuda" and not deterministic
    for Hkv, D, expected in [(4, 64, fused), (4, 128, False), (2, 64, False)]:
        seen = launches(Hkv, D)
        assert ("attention_bwd_dq" not in seen) == expected and seen["attention_bwd_dkdv"] == int(expected), (Hkv, D)


# -- what the kernels decline ---------------------------------------------------------------------

def test_unsupported_calls_are_declined():
    spec = AttentionSpec(scale=0.1)
    q, k, v = random_qkv(1, 1, 1, 4, 4, 320)
    assert "256" in kernels.unsupported_reason("emulator", spec, AttentionInputs(q, k, v))
    q, k, v = random_qkv(1, 1, 1, 4, 4, 64, Dv=300)
    assert "256" in kernels.unsupported_reason("emulator", spec, AttentionInputs(q, k, v))
    q, k, v = random_qkv(8, 8, 8, 1024, 1024, 16)
    assert "small shapes" in kernels.unsupported_reason("emulator", spec, AttentionInputs(q, k, v))
    q, k, v = random_qkv(1, 2, 1, 8, 8, 64)
    reason = kernels.unsupported_reason("emulator", spec, AttentionInputs(q, k.astype(mx.float16), v))
    assert "one float dtype" in reason
    with pytest.raises(ValueError, match="cannot run"):
        kernels.forward("emulator", spec, AttentionInputs(*random_qkv(1, 1, 1, 4, 4, 320)))
    with pytest.raises(ValueError, match="target"):
        kernels.is_available("vulkan")


@pytest.mark.parametrize("scale", [0.0, -0.125, 1e-31])
def test_scales_outside_the_kernels_range_are_declined_and_auto_routes_them_to_tiled(scale, monkeypatch):
    # the kernels take row maxes of raw q·kᵀ and use 1/scale (band.h's Scores): they need scale > 0
    q, k, v = random_qkv(1, 2, 1, 8, 8, 64)
    reason = kernels.unsupported_reason("emulator", AttentionSpec(scale=scale), AttentionInputs(q, k, v))
    assert reason is not None and "scale" in reason
    with pytest.raises(NotImplementedError, match="scale"):
        mfa.flash_attention(q, k, v, scale=scale, backend="emulator")
    # auto, on a machine whose native target is the emulator, takes it for scale 0.125 only
    monkeypatch.setattr(routing, "_gpu_kind", lambda: "emulator")
    chosen = {s: routing.choose("auto", AttentionSpec(scale=s), AttentionInputs(q, k, v), return_lse=True).backend
              for s in (0.125, scale)}
    assert chosen == {0.125: "emulator", scale: "tiled"}


def test_float32_large_head_dim_declined_on_metal(monkeypatch):
    monkeypatch.setenv("MFA_EMULATOR_ARCH", "metal")
    q, k, v = random_qkv(1, 1, 1, 4, 4, 256)
    reason = kernels.unsupported_reason("emulator", AttentionSpec(scale=0.1), AttentionInputs(q, k, v))
    assert "threadgroup memory" in reason


def test_metal_tiles_fit_threadgroup_memory():
    for D in kernels.blocks.HEAD_DIMS:
        for dtype in (mx.float16, mx.bfloat16):
            blocks = kernels.BlockSizes.default(D, dtype, "metal")
            for name, tiles in (("attention_fwd", blocks.fwd), ("attention_bwd_dq", blocks.dq),
                                ("attention_bwd_dkdv", blocks.dkdv)):
                assert tiles is not None, (D, dtype, name)
                assert kernels.blocks.shared_bytes(name, tiles, D, dtype.size) <= 32 * 1024


# -- fused backward (FUSED_DQ: dq by bulk reductions in the dk/dv kernel, $MFA_BWD=fused) ----------

def fused_launches(spec, inputs):
    """The kernels (name -> FUSED_DQ or None) that one backward launches (recorded, not run)."""
    def run():
        out, lse = attention.forward("emulator", spec, inputs)
        attention.backward("emulator", spec, inputs, out, lse, out, None)

    return {name: dict(template).get("FUSED_DQ") for name, template, _, _ in offline.record_cuda_launches(run)}


FUSED_CASES = {
    "dense": dict(causal=False),
    "causal gqa softcap": dict(causal=True, softcap=5.0),
    "window sinks dropout": dict(causal=True, window=(40, 3), sinks=True, dropout_p=0.2, dropout_seed=5),
    "key bias": dict(causal=True, bias_shape=(2, 4, 1, 90)),
    "varlen": dict(causal=True, lengths=([6, 0, 79, 13], [9, 4, 79, 0])),
    "block-sparse": dict(block_mask=True),
}


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_dq_backward(arch, monkeypatch, case):
    """$MFA_BWD=fused: no dq kernel runs, the dk/dv kernel adds dq, and every gradient matches the oracle."""
    monkeypatch.setenv("MFA_BWD", "fused")
    kw = dict(FUSED_CASES[case])
    dtype = mx.float16 if arch == "metal" else default_dtype(arch)  # float32 tiles are too narrow to fuse in 32 KB
    lengths = kw.pop("lengths", None)
    if lengths is not None:
        q, k, v = random_qkv(1, 4, 2, sum(lengths[0]), sum(lengths[1]), 64, dtype=dtype, seed=11)
    else:
        q, k, v = random_qkv(2, 4, 2, 70, 90, 64, dtype=dtype, seed=len(case))
    bias_shape = kw.pop("bias_shape", None)
    bias = None if bias_shape is None else mx.random.normal(bias_shape, key=mx.random.key(7)).astype(dtype)
    sinks = mx.random.normal((4,), key=mx.random.key(8)) if kw.pop("sinks", False) else None
    if kw.pop("block_mask", False):
        kw["block_mask"] = BlockMask.from_mask_mod(lambda b, h, i, j: (i // 16 + j // 16) % 3 != 1, 1, 1, 70, 90,
                                                   block_size=16)
    spec = AttentionSpec(scale=64**-0.5, causal=kw.get("causal", False), window=kw.get("window"),
                         softcap=kw.get("softcap"), has_bias=bias is not None, has_sinks=sinks is not None,
                         block_mask=kw.get("block_mask"), dropout_p=kw.get("dropout_p", 0.0),
                         dropout_seed=kw.get("dropout_seed", 0), varlen=lengths is not None)
    cu = (cu_seqlens(lengths[0]), cu_seqlens(lengths[1])) if lengths is not None else (None, None)
    launches = fused_launches(spec, AttentionInputs(q, k, v, bias, None, sinks, *cu))
    assert "attention_bwd_dq" not in launches and launches["attention_bwd_dkdv"] == 1
    check(q, k, v, kw.pop("causal", False), bias=bias, sinks=sinks, lengths=lengths, **kw)


def test_fused_dq_stays_split_where_the_dq_kernel_reduces_a_gradient(monkeypatch):
    """ALiBi slopes and a bias with every query row are reduced by the dq kernel: no fusion there."""
    monkeypatch.setenv("MFA_BWD", "fused")
    q, k, v = random_qkv(2, 4, 2, 70, 90, 64, dtype=mx.float32, seed=1)
    spec = AttentionSpec(scale=0.125, has_alibi=True)
    slopes = mx.full((4,), 0.1)
    assert fused_launches(spec, AttentionInputs(q, k, v, None, slopes, None, None, None))["attention_bwd_dkdv"] == 0
    bias = mx.zeros((1, 4, 70, 90))
    spec = AttentionSpec(scale=0.125, has_bias=True)
    assert fused_launches(spec, AttentionInputs(q, k, v, bias, None, None, None, None))["attention_bwd_dkdv"] == 0
    monkeypatch.setenv("MFA_BWD", "sometimes")
    with pytest.raises(ValueError, match="MFA_BWD"):
        fused_launches(AttentionSpec(scale=0.125), AttentionInputs(q, k, v, None, None, None, None, None))


def test_causal_grids_put_the_heads_in_x(arch):
    """HX (`attention.heads_first`): on the CUDA family a causal call's three kernels walk the
    heads in x, so the longest tiles of every head start first; windowed, block-sparse and
    non-causal calls, and Metal, keep the tiles in x.  The causal numerics of the other tests run
    under HX = 1 on the CUDA family."""
    q, k, v = random_qkv(2, 4, 2, 70, 90, 64, dtype=mx.float16, seed=2)
    mask = BlockMask.from_mask_mod(lambda b, h, i, j: (i // 16 + j // 16) % 3 != 1, 1, 1, 70, 90, block_size=16)

    def flags(**options):
        spec = AttentionSpec(scale=0.125, **options)

        def run():
            out, lse = attention.forward("emulator", spec, AttentionInputs(q, k, v))
            attention.backward("emulator", spec, AttentionInputs(q, k, v), out, lse, out, None)

        return {name: dict(template)["HX"] for name, template, _, _ in offline.record_cuda_launches(run)
                if name != "attention_bwd_preprocess"}

    assert set(flags(causal=True).values()) == {int(arch == "cuda")}
    for options in (dict(), dict(causal=True, window=(20, 0)), dict(causal=True, block_mask=mask)):
        assert set(flags(**options).values()) == {0}, options


# -- wgmma B tiles (WG = 1: the CUDA family's tensor-core reads from swizzled shared tiles) ---------

def wg_flags(spec, inputs):
    """The WG value of each kernel one forward and backward launch (recorded, not run)."""
    def run():
        out, lse = attention.forward("emulator", spec, inputs)
        attention.backward("emulator", spec, inputs, out, lse, out, None)

    return {name: dict(template).get("WG") for name, template, _, _ in offline.record_cuda_launches(run)}


@pytest.mark.parametrize("copies", ["at_wait", "early"])
@pytest.mark.parametrize("D,dtype", [(64, mx.bfloat16), (128, mx.float16)])
def test_wgmma_b_tiles_in_every_kernel(monkeypatch, D, dtype, copies):
    """bf16/f16 with head dims in 64s: the forward, dq and dk/dv kernels all read their B tiles with
    (emulated) wgmma — two column blocks at D = 128, ALiBi + sinks taking the split P·V — and match
    the oracle; ``$MFA_WGMMA=0`` goes back to mma.sync with 32-row warps in the forward.  The
    emulator runs a wgmma at its wait; its async copies land at their wait (a tile read too early
    is stale) or, ``$MFA_EMU_COPIES=early``, at their issue (a tile refilled while a product in
    flight still reads it is overwritten)."""
    monkeypatch.setenv("MFA_EMULATOR_ARCH", "cuda")
    monkeypatch.setenv("MFA_EMU_COPIES", copies)
    q, k, v = random_qkv(2, 4, 2, 150, 130, D, dtype=dtype, seed=D)
    slopes, sinks = mx.array([0.3, 0.1, 0.05, 0.02]), mx.random.normal((4,), key=mx.random.key(2))
    spec = AttentionSpec(scale=D**-0.5, causal=True, window=(90, 0), has_alibi=True, has_sinks=True)
    flags = wg_flags(spec, AttentionInputs(q, k, v, None, slopes, sinks, None, None))
    assert flags == {"attention_fwd": 1, "attention_bwd_dq": 1, "attention_bwd_dkdv": 1}
    check(q, k, v, True, window=(90, 0), slopes=slopes, sinks=sinks)
    monkeypatch.setenv("MFA_WGMMA", "0")
    flags = wg_flags(spec, AttentionInputs(q, k, v, None, slopes, sinks, None, None))
    assert {flags[n] for n in ("attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv")} == {0}
    assert attention.block_sizes("emulator", D, dtype).fwd == kernels.Tiles(128, 64, 4, 2)


@pytest.mark.parametrize("extras", ["plain", "alibi sinks", "block-sparse"])
def test_wgmma_forward_with_32_row_warps(monkeypatch, extras):
    """A forward of 128-row tiles on 4 warps (``$MFA_BLOCKS=fwd=128x64x4x2``) reads its B tiles
    with wgmma, two products a k-step (one per 16-row block of a warp), and matches the oracle,
    also with ALiBi + sinks (whose exact forward splits P·V in two) and a block mask."""
    monkeypatch.setenv("MFA_EMULATOR_ARCH", "cuda")
    monkeypatch.setenv("MFA_BLOCKS", "fwd=128x64x4x2")
    q, k, v = random_qkv(1, 4, 2, 300, 250, 64, dtype=mx.bfloat16, seed=11)
    slopes, sinks = (mx.array([0.3, 0.1, 0.05, 0.02]), mx.random.normal((4,), key=mx.random.key(3))) \
        if extras == "alibi sinks" else (None, None)
    mask = BlockMask.from_mask_mod(lambda b, h, i, j: (i // 64 + j // 64) % 3 != 1, 1, 1, 300, 250,
                                   block_size=64) if extras == "block-sparse" else None
    spec = AttentionSpec(scale=0.125, causal=mask is None, has_alibi=slopes is not None,
                         has_sinks=sinks is not None, block_mask=mask)
    assert wg_flags(spec, AttentionInputs(q, k, v, None, slopes, sinks, None, None))["attention_fwd"] == 1
    check(q, k, v, mask is None, slopes=slopes, sinks=sinks, block_mask=mask)


def test_wgmma_needs_warpgroups_of_16_row_warps(monkeypatch):
    """WG only where 4-warp groups own 16 rows each (32 in the forward) and the score tile's other
    side is in 64s."""
    t = kernels.Tiles
    assert kernels.blocks.wgmma("cuda", "attention_fwd", t(64, 64, 4, 2), 64, mx.bfloat16)
    assert kernels.blocks.wgmma("cuda", "attention_bwd_dkdv", t(128, 64, 4, 2), 128, mx.float16)
    assert kernels.blocks.wgmma("cuda", "attention_fwd", t(128, 64, 4, 2), 64, mx.bfloat16)  # 32-row warps: 2 a k-step
    assert not kernels.blocks.wgmma("cuda", "attention_bwd_dq", t(128, 64, 4, 2), 64, mx.bfloat16)  # forward only
    assert not kernels.blocks.wgmma("cuda", "attention_fwd", t(256, 64, 4, 2), 64, mx.bfloat16)
    assert not kernels.blocks.wgmma("cuda", "attention_bwd_dq", t(64, 32, 4, 2), 64, mx.bfloat16)
    assert not kernels.blocks.wgmma("cuda", "attention_fwd", t(64, 64, 4, 2), 80, mx.bfloat16)
    assert not kernels.blocks.wgmma("cuda", "attention_fwd", t(32, 64, 2, 2), 64, mx.bfloat16)
    assert not kernels.blocks.wgmma("metal", "attention_fwd", t(64, 64, 4, 2), 64, mx.bfloat16)
    monkeypatch.setenv("MFA_EMULATOR_ARCH", "cuda")
    assert attention.block_sizes("emulator", 80, mx.bfloat16).fwd == kernels.Tiles(128, 64, 4, 2)


def test_register_caps_follow_head_dim_variant_and_mfa_blocks(monkeypatch):
    """CUDA family, D = 64 with wgmma: the dq kernel gets ``__launch_bounds__(128, 3)`` and the
    forward ``(128, 4)`` (MIN_BLOCKS, in the header MLX compiles and in the offline source), except
    for the variants that spill under them (dq: a bias; forward: dropout, ALiBi, ...); D = 128
    has none; ``$MFA_BLOCKS`` sets them as a fifth number."""
    monkeypatch.setenv("MFA_EMULATOR_ARCH", "cuda")

    def caps(D, bias_shape=None, **options):
        q, k, v = random_qkv(1, 2, 2, 70, 72, D, dtype=mx.bfloat16, seed=3)
        bias = None if bias_shape is None else mx.zeros(bias_shape, mx.bfloat16)
        spec = AttentionSpec(scale=0.125, causal=True, has_bias=bias is not None, **options)
        inputs = AttentionInputs(q, k, v, bias, None, None, None, None)

        def run():
            out, lse = attention.forward("cuda", spec, inputs)
            attention.backward("cuda", spec, inputs, out, lse, out, None)

        calls = offline.record_cuda_launches(run)
        return {c[0]: dict(c[1]).get("MIN_BLOCKS") for c in calls}, calls

    found, calls = caps(64)
    assert found == {"attention_fwd": 4, "attention_bwd_dq": 3, "attention_bwd_dkdv": None}
    name, template, ins, outs = next(c for c in calls if c[0] == "attention_bwd_dq")
    assert "__global__ void __launch_bounds__(128, 3) f(" in offline.cuda_kernel_source(name, template, ins, outs, "f")
    assert "__launch_bounds__(128, 3)" in sources.launch_bounds((128, 3))
    assert sources.launch_bounds(None) == ""
    # a staged bias (rows of whole 16-byte chunks; shared by the heads, so the dq kernel reduces
    # dbias) spills under both caps; a key-padding one only under dq's
    assert caps(64, (1, 1, 70, 72))[0] == {"attention_fwd": None, "attention_bwd_dq": None, "attention_bwd_dkdv": None}
    assert caps(64, (1, 1, 1, 72))[0] == {"attention_fwd": 4, "attention_bwd_dq": None, "attention_bwd_dkdv": None}
    assert caps(64, dropout_p=0.1, dropout_seed=1)[0]["attention_fwd"] is None
    assert set(caps(128)[0].values()) == {None}
    monkeypatch.setenv("MFA_BLOCKS", "dq=64x64x4x2x2")
    assert caps(64, (1, 1, 70, 72))[0]["attention_bwd_dq"] == 2
