"""Kernel objects: each (target, kernel) is built once and called with per-shape template values."""

from __future__ import annotations

import functools
import os
import shutil
from typing import Optional, Tuple

import mlx.core as mx

from mfa.kernels import emulator, sources

# The buffers of every kernel body, in call order.
_VARIANTS = ["bias", "sched", "bits"]
IO = {
    "attention_fwd": (["q", "k", "v", "params", "fparams", "sinks", "slopes", *_VARIANTS], ["out", "lse"]),
    "attention_bwd_preprocess": (["out", "dout", "dlse", "params"], ["delta"]),
    "attention_bwd_dq": (["q", "k", "v", "dout", "lse", "out", "dlse", "params", "fparams", "slopes", *_VARIANTS],
                         ["dq_out", "delta", "dslopes_part", "dbias", "dbias_total"]),
    "attention_bwd_dkdv": (["q", "k", "v", "dout", "lse", "delta", "params", "fparams", "slopes", *_VARIANTS],
                           ["dk_out", "dv_out", "dbias", "dq_accum"]),
}


def emulator_arch() -> str:
    """Fragment family the emulator runs: ``$MFA_EMULATOR_ARCH`` (``metal``, the default, or ``cuda``)."""
    arch = os.environ.get("MFA_EMULATOR_ARCH", "metal")
    if arch not in emulator.ARCHS:
        raise ValueError(f"MFA_EMULATOR_ARCH={arch!r} must be one of {emulator.ARCHS}")
    return arch


def arch_of(target: str) -> str:
    """The fragment family a target compiles the tile layer with."""
    return emulator_arch() if target == "emulator" else target


def is_available(target: str) -> bool:
    """Whether `target`'s kernels can run here (device present / compiler present)."""
    if target == "metal":
        return mx.metal.is_available()
    if target == "cuda":
        return hasattr(mx, "cuda") and mx.cuda.is_available()
    if target == "emulator":
        return emulator.compiler() is not None and shutil.which(emulator.compiler()) is not None
    raise ValueError(f"unknown {target=}")


@functools.cache
def kernel(target: str, name: str, arch: str, shared: int = 0, launch_bounds: Optional[Tuple[int, int]] = None):
    """The kernel object of `name` for `target`.

    CUDA sets the dynamic shared memory size (``shared`` bytes) once per kernel object, so each
    size is its own object (and its own NVRTC module, through the SMEM template value);
    ``launch_bounds = (threads, min_blocks)`` gives the kernel ``__launch_bounds__`` (in its
    header, `sources.launch_bounds`), so each bound is its own object too.
    """
    inputs, outputs = IO[name]
    source = sources.gpu_body(name)
    if target == "metal":
        return mx.fast.metal_kernel(name=name, input_names=inputs, output_names=outputs, source=source,
                                    header=sources.header("metal"))
    if target == "cuda":
        return mx.fast.cuda_kernel(name=name, input_names=inputs, output_names=outputs, source=source,
                                   header=sources.header("cuda") + sources.launch_bounds(launch_bounds),
                                   shared_memory=shared)
    if target == "emulator":
        return emulator.EmulatorKernel(name, inputs, outputs, source, arch=arch)
    raise ValueError(f"unknown {target=}")
