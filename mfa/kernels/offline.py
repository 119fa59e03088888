"""The GPU targets' full kernel sources without their GPUs, for compile checks on any machine.

- Metal: MLX's own generator.  A plain ``metal_kernel`` call raises without Metal, but under
  ``mx.export_function`` tracing with ``verbose=True`` MLX prints the generated source.  We trace
  the launchers with ``$MFA_KERNEL_VERBOSE`` set and cut the sources out of the captured output.
  They compile with g++ against the stub ``metal/stub/metal_stdlib``.
- CUDA: MLX builds ``cuda_kernel`` sources in C++ (``cuda/custom_kernel.cpp::build_kernel``) and
  ships no device headers; `cuda_translation_unit` reproduces that preamble and signature
  (with ``metal/stub/mlx/backend/cuda/device/utils.cuh``) for nvcc.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Callable, Dict, List, Sequence, Tuple

import mlx.core as mx

from mfa.kernels import build, sources

_CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.int32: "int32_t",
               mx.uint32: "uint32_t"}
_GENERATED = re.compile(r"Generated source code for `(\w+)`:\n```\n(.*?)\n```", re.S)


def trace_metal_sources(fn: Callable, *args: mx.array, read_stdout: Callable[[], str]) -> Dict[str, str]:
    """Trace ``fn(*args)`` (which launches ``"metal"`` kernels) and return ``{kernel name: Metal source}``.

    Args:
        fn: calls the launchers with target ``"metal"``.
        args: example inputs.
        read_stdout: returns what was printed to the process's stdout since the last call
            (MLX prints from C++, so capture file descriptor 1, e.g. pytest's ``capfd``).
    """
    previous = os.environ.get("MFA_KERNEL_VERBOSE")
    os.environ["MFA_KERNEL_VERBOSE"] = "1"
    try:
        read_stdout()
        with tempfile.TemporaryDirectory() as tmp:
            mx.export_function(os.path.join(tmp, "trace.mlxfn"), fn, *args)
        printed = read_stdout()
    finally:
        if previous is None:
            os.environ.pop("MFA_KERNEL_VERBOSE")
        else:
            os.environ["MFA_KERNEL_VERBOSE"] = previous
    return dict(_GENERATED.findall(printed))


class _Recorder:
    """Stands in for a cuda_kernel object: records each call's instantiation, returns zeros."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __call__(self, *, inputs, output_shapes, output_dtypes, template, **_):
        self.calls.append((self.name, list(template), [x.dtype for x in inputs], list(output_dtypes)))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]


def record_cuda_launches(fn: Callable, *args) -> List[Tuple[str, list, list, list]]:
    """Run ``fn(*args)`` (launchers with target ``"cuda"``) without a GPU; return its kernel
    instantiations as ``(name, template, input dtypes, output dtypes)``."""
    calls: list = []
    real_kernel, real_available = build.kernel, build.is_available
    build.kernel = lambda target, name, arch, *_: _Recorder(name, calls)
    build.is_available = lambda target: target == "cuda" or real_available(target)
    try:
        fn(*args)
    finally:
        build.kernel, build.is_available = real_kernel, real_available
    return calls


def cuda_kernel_source(name: str, template: Sequence[Tuple[str, object]], in_dtypes: Sequence[mx.Dtype],
                       out_dtypes: Sequence[mx.Dtype], function_name: str = "") -> str:
    """One ``__global__`` function as MLX's ``cuda_kernel`` writes it (signature + constexprs + body),
    with the ``__launch_bounds__`` that `build.kernel`'s header gives a MIN_BLOCKS template."""
    inputs, outputs = build.IO[name]
    values = dict(template)
    bounds = (sources.launch_bounds_attribute(32 * values["NW"], values["MIN_BLOCKS"]) + " "
              if values.get("MIN_BLOCKS") else "")
    params = [f"const {_CUDA_TYPES[d]}* {n}" for n, d in zip(inputs, in_dtypes)]
    params += [f"{_CUDA_TYPES[d]}* {n}" for n, d in zip(outputs, out_dtypes)]
    consts = []
    for tname, value in template:
        if isinstance(value, mx.Dtype):
            consts.append(f"  using {tname} = {_CUDA_TYPES[value]};")
        else:
            consts.append(f"  constexpr int {tname} = {int(value)};")
    return "\n".join([
        f"__global__ void {bounds}{function_name or 'custom_kernel_' + name}({', '.join(params)}) {{",
        *consts,
        sources.gpu_body(name),
        "}",
    ])


def cuda_translation_unit(kernels: List[str]) -> str:
    """A .cu file with MLX's cuda_kernel preamble around `cuda_kernel_source` functions."""
    return "\n".join([
        '#include "mlx/backend/cuda/device/utils.cuh"',
        "#include <cooperative_groups.h>",
        sources.header("cuda"),
        "namespace mlx::core::cu {",
        "namespace cg = cooperative_groups;",
        *kernels,
        "}  // namespace mlx::core::cu",
    ])
