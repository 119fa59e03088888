"""The GPU targets' kernel sources compile here, with no GPU.

- Metal: the sources MLX itself generates for our kernels (printed under export tracing) are
  compiled by g++ against the stub ``metal/stub/metal_stdlib``; a broken body fails here.
- CUDA: each kernel, wrapped as MLX's cuda_kernel wraps it, is compiled by nvcc for sm_90a
  (skipped on machines without nvcc).
"""

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest

from mfa import BlockMask
from mfa.kernels import attention, emulator, offline, sources
from mfa.ops.spec import AttentionInputs, AttentionSpec

STUB = sources.kernel_dir() / "stub"


def variant_call(name: str, dtype, D: int):
    """``(spec, inputs)`` of a call that switches on the named variant of the kernels."""
    q = mx.zeros((2, 4, 33, D), dtype)
    k = mx.zeros((2, 2, 40, D), dtype)
    if name == "plain":
        return AttentionSpec(scale=0.125, causal=True), AttentionInputs(q, k, k)
    if name == "everything":  # full bias, softcap, alibi, sinks, dropout, window
        spec = AttentionSpec(scale=0.125, causal=True, window=(9, -1), softcap=5.0, dropout_p=0.1, has_bias=True,
                             has_alibi=True, has_sinks=True)
        return spec, AttentionInputs(q, k, k, mx.zeros((2, 4, 33, 40), dtype), mx.ones((2, 4)), mx.ones((4,)))
    if name.startswith("bias"):  # the dbias reductions: over keys, over rows, over both
        shape = {"bias_rows": (1, 4, 33, 1), "bias_keys": (2, 1, 1, 40), "bias_scalar": (1, 1, 1, 1)}[name]
        return AttentionSpec(scale=0.125, has_bias=True), AttentionInputs(q, k, k, mx.zeros(shape, mx.float32))
    if name == "varlen":
        cu_q, cu_k = mx.array([0, 13, 13, 33]), mx.array([0, 20, 31, 40])
        spec = AttentionSpec(scale=0.125, causal=True, varlen=True, has_alibi=True)
        return spec, AttentionInputs(q[:1], k[:1], k[:1], None, mx.ones((3, 4)), None, cu_q, cu_k)
    if name == "sparse":
        mask = BlockMask.from_mask_mod(lambda b, h, i, j: (j <= i) & (j % 3 != 1), 1, 4, 33, 40, block_size=16)
        return AttentionSpec(scale=0.125, block_mask=mask, dropout_p=0.3), AttentionInputs(q, k, k)
    raise ValueError(name)


VARIANTS = ["plain", "everything", "bias_rows", "bias_keys", "bias_scalar", "varlen", "sparse"]


def metal_sources(capfd, dtype, D, variant="plain"):
    spec, inputs = variant_call(variant, dtype, D)

    def fn(q, k, v, dout):
        call = inputs._replace(q=q, k=k, v=v)
        out, lse = attention.forward("metal", spec, call)
        grads = attention.backward("metal", spec, call, out, lse, dout, None)
        return (out, lse, *[g for g in grads.arrays() if g.dtype != mx.int32])

    q, k = inputs.q, inputs.k
    return offline.trace_metal_sources(fn, q, k, k, q, read_stdout=lambda: capfd.readouterr().out)


def gxx_check(source: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "kernel.metal.cpp"
    path.write_text(source)
    cmd = [emulator.compiler(), "-std=c++17", "-fsyntax-only", "-Wno-attributes", "-I", str(STUB), "-x", "c++",
           str(path)]
    return subprocess.run(cmd, capture_output=True, text=True)


needs_cxx = pytest.mark.skipif(emulator.compiler() is None, reason="no C++ compiler")


@needs_cxx
@pytest.mark.parametrize("dtype,D", [(mx.bfloat16, 64), (mx.float16, 256), (mx.float32, 96)])
def test_generated_metal_sources_compile_against_stub(capfd, tmp_path, monkeypatch, dtype, D):
    found = metal_sources(capfd, dtype, D)
    assert set(found) == set(sources.KERNELS) - {"attention_bwd_preprocess"}  # the dq kernel computes delta
    monkeypatch.setenv("MFA_BWD", "fused")  # delta by the preprocess kernel, dq in the dk/dv kernel
    found.update(metal_sources(capfd, dtype, D))
    assert "attention_bwd_preprocess" in found or D == 256  # a fused D = 256 tile exceeds 32 KB
    for name, source in found.items():
        assert f"custom_kernel_{name}" in source and "[[kernel]]" in source
        result = gxx_check(source, tmp_path)
        assert result.returncode == 0, f"{name}:\n{result.stderr[-4000:]}"


@needs_cxx
@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_generated_metal_variant_sources_compile_against_stub(capfd, tmp_path, variant):
    found = metal_sources(capfd, mx.bfloat16, 64, variant)
    assert set(found) == {"attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"}
    for name in found:
        result = gxx_check(found[name], tmp_path)
        assert result.returncode == 0, f"{name}:\n{result.stderr[-4000:]}"


@needs_cxx
def test_metal_check_catches_a_broken_body(capfd, tmp_path):
    source = metal_sources(capfd, mx.float16, 64)["attention_fwd"]
    broken = source.replace("row_max(s, m_tile);", "row_max(s, m_tile)")
    assert broken != source
    assert gxx_check(broken, tmp_path).returncode != 0
    # an error that only shows once the template is instantiated with the real T
    broken = source.replace("const int tid =", "typename T::no_such_member bad; const int tid =")
    assert gxx_check(broken, tmp_path).returncode != 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path, monkeypatch):
    calls = []
    every_variant = [("plain", mx.bfloat16, 128), ("plain", mx.float16, 64)] + [(v, mx.bfloat16, 64)
                                                                               for v in VARIANTS[1:]]
    # both backward forms, and the kernels with and without wgmma B tiles (a forward of 8 warps of
    # 16 rows takes them too); staged bias tiles copied ahead of the others (BIAS_LEAD)
    bias_lead = "fwd=64x64x4x2x0x1,dq=64x64x4x2x0x1,dkdv=64x64x4x2x0x2"
    for bwd, wgmma, blocks, variants in [("split", "1", "fwd=128x64x8x2", every_variant), ("fused", "1", "", every_variant),
                                         ("split", "0", "", every_variant),
                                         ("split", "1", bias_lead, [("everything", mx.bfloat16, 64)])]:
        monkeypatch.setenv("MFA_BWD", bwd)
        monkeypatch.setenv("MFA_WGMMA", wgmma)
        monkeypatch.setenv("MFA_BLOCKS", blocks)
        for variant, dtype, D in variants:
            spec, inputs = variant_call(variant, dtype, D)

            def fn():
                out, lse = attention.forward("cuda", spec, inputs)
                attention.backward("cuda", spec, inputs, out, lse, out.astype(dtype), None)

            calls += offline.record_cuda_launches(fn)
    assert {c[0] for c in calls} == set(sources.KERNELS)
    assert {dict(c[1]).get("BIAS_LEAD") for c in calls} >= {0, 1, 2}
    functions = [offline.cuda_kernel_source(*c, function_name=f"custom_kernel_{c[0]}_{i}") for i, c in enumerate(calls)]
    path = tmp_path / "kernels.cu"
    path.write_text(offline.cuda_translation_unit(functions))
    cmd = ["nvcc", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-c", "-o", str(tmp_path / "kernels.o"),
           "-I", str(STUB), str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
