"""Kernel sources: the bodies in ``mfa/kernels/metal/`` and the headers each target compiles them with.

The sources ship inside the package (package data), so an installed mfa finds them next to this
module.  Every kernel is one body file, ``metal/<name>.metal``, written once in a small C++ dialect over
the tile API.  A target gets ``header = prelude + fragment family + tile.h + band.h + variants.h``:

    target      prelude            fragment family        compiled by
    metal       prelude_metal.h    frag_simdgroup.h       Metal (mx.fast.metal_kernel)
    cuda        prelude_cuda.h     frag_mma.h (+ wgmma)   NVRTC (mx.fast.cuda_kernel)
    emulator    prelude_cpu.h      either (its ``arch``)  the system C++ compiler (emulator.py)
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Optional, Tuple

KERNELS = (
    "attention_fwd",
    "attention_bwd_preprocess",
    "attention_bwd_dq",
    "attention_bwd_dkdv",
)
FRAGMENTS = {"metal": "frag_simdgroup.h", "cuda": "frag_mma.h"}
# Parts of a fragment family that build on tile.h (the CUDA family's wgmma B tiles).
FRAGMENT_EXTRAS = {"metal": "", "cuda": "frag_wgmma.h"}


def kernel_dir() -> Path:
    """The directory holding the kernel sources (``$MFA_KERNEL_DIR``, else the package's ``metal/``)."""
    env = os.environ.get("MFA_KERNEL_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "metal"


@functools.cache
def read(name: str) -> str:
    """The text of one file of the kernel directory."""
    return (kernel_dir() / name).read_text()


def body(kernel: str) -> str:
    """The body (``source``) of a kernel."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel=}; known: {KERNELS}")
    return read(f"{kernel}.metal")


_COMMENT = re.compile(r'//[^"\n]*$')  # a line comment with no string literal after it


def compact(text: str) -> str:
    """`text` without line comments, indentation and blank lines, for the GPU compilers.

    MLX rebuilds and hashes a custom kernel's whole source on every call (``cuda_kernel``
    concatenates header and body per call and hashes them per launch), so the source's length is
    host time on every launch; the comments are half of it.  The emulator compiles the sources
    as written.
    """
    lines = (_COMMENT.sub("", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line) + "\n"


@functools.cache
def gpu_body(kernel: str) -> str:
    """The body of a kernel as the GPU targets get it (`compact`)."""
    return compact(body(kernel))


def tile_layer(arch: str) -> str:
    """The tile layer for a fragment family: ``"metal"`` (simdgroup 8x8) or ``"cuda"`` (mma m16n8k16)."""
    extra = read(FRAGMENT_EXTRAS[arch]) if FRAGMENT_EXTRAS[arch] else ""
    return read(FRAGMENTS[arch]) + read("tile.h") + extra + read("band.h") + read("variants.h")


def launch_bounds_attribute(threads: int, min_blocks: int) -> str:
    """``__launch_bounds__(threads, min_blocks)``, the attribute of a CUDA kernel function."""
    return f"__launch_bounds__({threads}, {min_blocks})"


def launch_bounds(bounds: Optional[Tuple[int, int]]) -> str:
    """Header lines that give the kernel after them `launch_bounds_attribute` of ``bounds``.

    MLX writes the signature itself (``__global__ void custom_kernel_...``) after the header, so
    the header redefines ``__global__`` (NVRTC: ``__location__(global)``); "" for None.
    """
    if bounds is None:
        return ""
    return f"#undef __global__\n#define __global__ __location__(global) {launch_bounds_attribute(*bounds)}\n"


@functools.cache
def header(target: str) -> str:
    """The ``header`` passed with every body to a GPU target's kernel builder (`compact`)."""
    if target == "metal":
        return compact(read("prelude_metal.h") + tile_layer("metal"))
    if target == "cuda":
        return compact(read("prelude_cuda.h") + tile_layer("cuda"))
    raise ValueError(f"{target=} has no GPU header (the emulator builds its own, see emulator.py)")
