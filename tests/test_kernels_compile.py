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

from mfa.kernels import attention, emulator, offline, sources
from mfa.ops.spec import AttentionInputs, AttentionSpec

STUB = sources.kernel_dir() / "stub"


def metal_sources(capfd, dtype, D, causal=True):
    spec = AttentionSpec(scale=0.125, causal=causal)

    def fn(q, k, v, dout):
        inputs = AttentionInputs(q, k, v)
        out, lse = attention.forward("metal", spec, inputs)
        return (out, lse, *attention.backward("metal", spec, inputs, out, lse, dout, None).arrays())

    q = mx.zeros((1, 2, 33, D), dtype)
    k = mx.zeros((1, 1, 40, D), dtype)
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
def test_generated_metal_sources_compile_against_stub(capfd, tmp_path, dtype, D):
    found = metal_sources(capfd, dtype, D)
    assert set(found) == set(sources.KERNELS)
    for name, source in found.items():
        assert f"custom_kernel_{name}" in source and "[[kernel]]" in source
        result = gxx_check(source, tmp_path)
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
def test_cuda_sources_compile_with_nvcc(tmp_path):
    spec = AttentionSpec(scale=0.1, causal=True)

    def fn(q, k, v):
        inputs = AttentionInputs(q, k, v)
        out, lse = attention.forward("cuda", spec, inputs)
        attention.backward("cuda", spec, inputs, out, lse, out, None)

    calls = []
    for dtype, D in ((mx.bfloat16, 128), (mx.float16, 64)):
        q = mx.zeros((1, 2, 40, D), dtype)
        calls += offline.record_cuda_launches(fn, q, q, q)
    assert {c[0] for c in calls} == set(sources.KERNELS)
    functions = [offline.cuda_kernel_source(*c, function_name=f"custom_kernel_{c[0]}_{i}") for i, c in enumerate(calls)]
    path = tmp_path / "kernels.cu"
    path.write_text(offline.cuda_translation_unit(functions))
    cmd = ["nvcc", "-std=c++17", "-arch=sm_90a", "-c", "-o", str(tmp_path / "kernels.o"), "-I", str(STUB), str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
