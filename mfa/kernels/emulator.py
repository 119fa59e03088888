"""CPU executor: runs the GPU kernel bodies on the CPU, compiled by the system C++ compiler.

`EmulatorKernel` has the construction and call interface of ``mx.fast.metal_kernel`` /
``mx.fast.cuda_kernel``, so the same launch code drives all three targets.  Each (body, template,
dtypes) becomes one shared library (``g++ -O2``), cached on disk under ``$MFA_CACHE_DIR``
(default ``~/.cache/mfa``) and loaded once per process.  The runtime (``metal/emu/runtime.h``)
runs every GPU thread as a fiber with barriers, shuffles and warp matrix instructions honoured.
Inputs and outputs go through numpy, so a call evaluates its inputs: fine in eager code and
under ``mx.grad``; not traceable by ``mx.compile``.  Slow by design: small shapes only.

``$MFA_EMULATOR_SANITIZE=address`` builds the kernels with AddressSanitizer, so that every plain
load and store of a kernel body is checked too (the runtime checks the copies, stores and atomic
adds it performs itself in any build).  The process must have ASan's runtime loaded first::

    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
        ASAN_OPTIONS=detect_leaks=0 MFA_EMULATOR_SANITIZE=address python -m pytest ...

An out-of-bounds access then ends the process with ASan's report.  The emulator-backed suites pass
so (tests/test_kernels_emulator.py, test_serving_kernels.py, test_attention.py, test_varlen.py, ...);
tests that start nvcc fail there, as nvcc inherits the preload.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from mfa.kernels import sources

ARCHS = ("metal", "cuda")
FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-Wno-attributes")

_C_TYPES = {
    mx.float32: "float",
    mx.float16: "half",
    mx.bfloat16: "bfloat16_t",
    mx.int32: "int32_t",
    mx.uint32: "uint32_t",
    mx.bool_: "bool",
}
_NP_TYPES = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,  # bit patterns
    mx.int32: np.int32,
    mx.uint32: np.uint32,
    mx.bool_: np.bool_,
}


def compiler() -> Optional[str]:
    """The C++ compiler the executor uses (``$CXX``, else g++, clang++ or c++), or None."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")


def sanitizer() -> str:
    """``$MFA_EMULATOR_SANITIZE``: ``""`` (none) or ``"address"``."""
    value = os.environ.get("MFA_EMULATOR_SANITIZE", "")
    if value not in ("", "address"):
        raise ValueError(f"MFA_EMULATOR_SANITIZE={value!r} must be 'address' or empty")
    return value


def _asan_loaded() -> bool:
    """Whether AddressSanitizer's runtime is in this process (preloaded)."""
    try:
        ctypes.CDLL(None).__asan_init  # noqa: B018
        return True
    except AttributeError:
        return False


def asan_preload() -> Optional[str]:
    """The ``LD_PRELOAD`` value that loads the `compiler`'s AddressSanitizer runtime (and libstdc++,
    whose throws ASan intercepts) into a process, or None where the compiler has none."""
    cxx = compiler()
    if cxx is None:
        return None
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path):
            return None
        libs.append(path)
    return " ".join(libs)


def build_flags() -> Tuple[str, ...]:
    """The compiler flags of a kernel build: `FLAGS`, plus AddressSanitizer's under `sanitizer`."""
    if sanitizer() != "address":
        return FLAGS
    if not _asan_loaded():
        raise RuntimeError("MFA_EMULATOR_SANITIZE=address needs AddressSanitizer's runtime loaded first: run with "
                           f"LD_PRELOAD={asan_preload() or '<the compiler has no libasan.so>'!r} "
                           "ASAN_OPTIONS=detect_leaks=0")
    return FLAGS + ("-fsanitize=address", "-fno-omit-frame-pointer", "-g")


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$MFA_CACHE_DIR/emulator`` (default ``~/.cache/mfa``)."""
    return Path(os.environ.get("MFA_CACHE_DIR", "~/.cache/mfa")).expanduser() / "emulator"


def _c_type(dtype: mx.Dtype) -> str:
    if dtype not in _C_TYPES:
        raise ValueError(f"the emulator has no C type for {dtype=}")
    return _C_TYPES[dtype]


@functools.cache
def _runtime_fingerprint() -> str:
    """Hash of the files the generated source includes (so editing them rebuilds)."""
    root = sources.kernel_dir()
    h = hashlib.sha256()
    for p in sorted([root / "prelude_cpu.h", *(root / "emu").glob("*.h"), root / "stub" / "metal_stdlib"]):
        h.update(p.read_bytes())
    return h.hexdigest()


def _load(source: str) -> ctypes.CDLL:
    """Compile (or find in the disk cache) and load one generated translation unit."""
    return _load_built(source, build_flags())


@functools.cache
def _load_built(source: str, flags: Tuple[str, ...]) -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("the emulator needs a C++ compiler: set $CXX or install g++")
    key = hashlib.sha256("\0".join([source, _runtime_fingerprint(), cxx, *flags]).encode()).hexdigest()[:32]
    directory = cache_dir()
    so = directory / f"{key}.so"
    if not so.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            cpp = Path(tmp) / "kernel.cpp"
            cpp.write_text(source)
            out = Path(tmp) / "kernel.so"
            cmd = [cxx, *flags, "-I", str(sources.kernel_dir()), str(cpp), "-o", str(out)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"emulator build failed ({' '.join(cmd)}):\n{result.stderr[-6000:]}")
            os.replace(out, so)  # atomic: concurrent builders of the same key are harmless
    lib = ctypes.CDLL(str(so))
    lib.mfa_launch.restype = ctypes.c_char_p
    lib.mfa_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_long), ctypes.c_int,
                               ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    return lib


class EmulatorKernel:
    """A kernel body run by the CPU executor, called like ``mx.fast.metal_kernel``'s kernels.

    Args:
        name: kernel name (for messages).
        input_names, output_names: the body's buffer names, in call order.
        source: the kernel body.
        header: code placed before the body (after the CPU prelude and the tile layer).
        arch: which fragment family the tile layer uses: ``"metal"`` (simdgroup 8x8 matrices)
            or ``"cuda"`` (mma.sync m16n8k16, ldmatrix and wgmma, bf16/fp16 only).
    """

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str = "", arch: str = "metal"):
        if arch not in ARCHS:
            raise ValueError(f"{arch=} must be one of {ARCHS}")
        self.name, self.arch = name, arch
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.source, self.header = source, header

    def translation_unit(self, template, in_dtypes, out_dtypes) -> str:
        """The C++ source the executor compiles for one instantiation."""
        params = [f"const {_c_type(d)}* {n}" for n, d in zip(self.input_names, in_dtypes)]
        params += [f"{_c_type(d)}* {n}" for n, d in zip(self.output_names, out_dtypes)]
        consts = []
        for tname, value in template:
            if isinstance(value, mx.Dtype):
                consts.append(f"using {tname} = {_c_type(value)};")
            elif isinstance(value, bool):
                consts.append(f"constexpr bool {tname} = {'true' if value else 'false'};")
            else:
                consts.append(f"constexpr int {tname} = {int(value)};")
        args = [f"({p.rsplit(' ', 1)[0]})buffers[{i}]" for i, p in enumerate(params)]
        define = "MFA_EMU_METAL" if self.arch == "metal" else "MFA_EMU_CUDA"
        return "\n".join([
            f"#define {define} 1",
            '#include "prelude_cpu.h"',
            "#include <string>",
            sources.tile_layer(self.arch),
            self.header,
            f"static void mfa_body_{self.name}({', '.join(params)}, uint3 threadgroup_position_in_grid,",
            "                               unsigned thread_index_in_threadgroup) {",
            *consts,
            self.source,
            "}",
            'extern "C" const char* mfa_launch(void** buffers, const long* sizes, int nbuffers, const int* groups,',
            "                                  int threads) {",
            "  static thread_local std::string error;",
            "  std::vector<emu::Range> ranges;",
            "  for (int i = 0; i < nbuffers; ++i) ranges.push_back({(const unsigned char*)buffers[i], size_t(sizes[i])});",
            "  error = emu::launch(groups, threads, ranges, [&](int x, int y, int z, int t) {",
            "    uint3 group = {unsigned(x), unsigned(y), unsigned(z)};",
            f"    mfa_body_{self.name}({', '.join(args)}, group, unsigned(t));",
            "  });",
            "  return error.c_str();",
            "}",
        ])

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(),
                 init_value=None, verbose=False, stream=None):
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.name}: {len(inputs)} inputs for {len(self.input_names)} names")
        if threadgroup[1] != 1 or threadgroup[2] != 1:
            raise ValueError(f"{self.name}: the emulator runs 1-D threadgroups, got {threadgroup=}")
        source = self.translation_unit(template, [x.dtype for x in inputs], output_dtypes)
        if verbose:
            print(f"Generated source code for `{self.name}` (emulator):\n```\n{source}\n```")
        lib = _load(source)
        arrays = [np.ascontiguousarray(np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)) for x in inputs]
        outs = []
        for shape, dtype in zip(output_shapes, output_dtypes):
            o = np.empty(tuple(shape), dtype=_NP_TYPES[dtype])
            if init_value is None:
                o.view(np.uint8).fill(0xFF)  # NaN: unwritten outputs show up in tests
            elif dtype == mx.bfloat16:
                o[...] = np.array(mx.array(init_value, dtype=mx.bfloat16).view(mx.uint16))
            else:
                o[...] = init_value
            outs.append(o)
        everything = arrays + outs
        buffers = (ctypes.c_void_p * len(everything))(*[a.ctypes.data for a in everything])
        sizes = (ctypes.c_long * len(everything))(*[a.nbytes for a in everything])
        groups = (ctypes.c_int * 3)(*[-(-g // t) for g, t in zip(grid, threadgroup)])
        error = lib.mfa_launch(buffers, sizes, len(everything), groups, int(threadgroup[0]))
        if error:
            raise RuntimeError(f"{self.name}: {error.decode()}")
        result = []
        for o, dtype in zip(outs, output_dtypes):
            a = mx.array(o)
            result.append(a.view(mx.bfloat16) if dtype == mx.bfloat16 else a)
        return result
