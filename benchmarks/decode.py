"""Decode attention on the GPU: mfa's split-K kernel vs MLX SDPA, contiguous vs paged (issue 7).

One run measures, for ``B=8, H=32, Hkv=8, D=128``, a 32k-token bf16 cache and 1 query token (flags change
them):

* the native kernel (``decode_attention(..., backend=<gpu>)``) on a contiguous cache and on paged pools
  with shuffled pages (page 16 and 64), for a few launch shapes (`Tuning`), plus the tiled MLX-ops path;
* ``mx.fast.scaled_dot_product_attention`` on the same contiguous cache;
* GB/s of K/V read (``2 · B · Hkv · N · D · bytes`` per call), % of the peak bandwidth, speed-up over SDPA;
* correctness: the kernel vs the tiled path and SDPA at full size, and on small shapes with every option
  (window, softcap, sinks, ALiBi, several queries, GQA ratios, head dims, dtypes, page sizes);
* tokens/s of `mfa.serving.Runtime` on the example model (``mfa.nn.CausalLM``, the training example's
  ``gpu`` preset, random weights or ``--checkpoint``).

Each part is guarded: a failure is recorded in the output and the run goes on. Results go to
``OUT/decode.json`` and ``OUT/decode.md``::

    source .gpu/setup.sh && python benchmarks/decode.py --out runs/decode
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mfa.serving import KVView, Runtime, decode_attention  # noqa: E402
from mfa.serving import native  # noqa: E402
from mfa.serving.decode import _spec  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/decode"), help="directory for decode.json / decode.md")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cache", type=int, default=32768, help="cached tokens per sequence")
    p.add_argument("--queries", type=int, default=1, help="new query tokens per sequence")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--pages", type=int, nargs="*", default=[16, 64], help="page sizes of the paged runs")
    p.add_argument("--peak-gbs", type=float, default=3350.0, help="memory bandwidth of the GPU, GB/s (H100 SXM)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--trials", type=int, default=15, help="timed trials (the median is reported)")
    p.add_argument("--calls", type=int, default=10, help="calls per trial, evaluated together")
    p.add_argument("--checkpoint", type=Path, help="a train.py checkpoint for the runtime part")
    p.add_argument("--skip-runtime", action="store_true")
    return p.parse_args(argv)


TUNINGS = [
    native.Tuning(),  # tensor cores (decode_split_mma), 4 warps: the CUDA default
    native.Tuning(mma=False),  # CUDA cores (decode_split)
    native.Tuning(threads=256),
    native.Tuning(threads=64),
    native.Tuning(mma=False, steps=2),
    native.Tuning(mma=False, steps=8),
    native.Tuning(blocks=1024),
    native.Tuning(blocks=16384),
]


def timed(fn, args) -> float:
    """Median seconds per call: ``args.calls`` calls evaluated together, over ``args.trials`` trials."""
    for _ in range(args.warmup):
        mx.eval(fn())
    times = []
    for _ in range(args.trials):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(args.calls)])
        times.append((time.perf_counter() - t0) / args.calls)
    return statistics.median(times)


def paged_copy(k: mx.array, v: mx.array, page: int, seed: int):
    """The cache ``(B, Hkv, N, D)`` as pools ``(P, page, Hkv, D)`` with shuffled pages and a block table."""
    B, Hkv, N, D = k.shape
    per_row = -(-N // page)
    P = B * per_row
    perm = np.random.default_rng(seed).permutation(P)  # logical page i lives in pool page perm[i]
    inverse = mx.array(np.argsort(perm).astype(np.int32))

    def pool(x):
        pad = per_row * page - N
        if pad:
            x = mx.concatenate([x, mx.zeros((B, Hkv, pad, D), x.dtype)], axis=2)
        x = x.reshape(B, Hkv, per_row, page, D).transpose(0, 2, 3, 1, 4).reshape(P, page, Hkv, D)
        return mx.contiguous(x[inverse])

    table = perm.reshape(B, per_row).astype(np.int32)
    k_pool, v_pool = pool(k), pool(v)
    mx.eval(k_pool, v_pool)
    return k_pool, v_pool, table


def rel_err(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30)).item()


def bandwidth(args, target: str) -> dict:
    """Timings of the full-size decode on every path."""
    dtype = getattr(mx, args.dtype)
    B, H, Hkv, N, D, Nq = args.batch, args.heads, args.kv_heads, args.cache, args.head_dim, args.queries
    key = mx.random.key(0)
    kq, kk, kv = mx.random.split(key, 3)
    q = mx.random.normal((B, H, Nq, D), key=kq).astype(dtype)
    k = mx.random.normal((B, Hkv, N, D), key=kk).astype(dtype)
    v = mx.random.normal((B, Hkv, N, D), key=kv).astype(dtype)
    mx.eval(q, k, v)
    kv_bytes = 2 * B * Hkv * N * D * dtype.size
    scale = D**-0.5
    contiguous = KVView.contiguous(k, v, N)
    rows, outputs = [], {}

    def record(name, fn, **extra):
        row = {"case": name, **extra}
        try:
            sec = timed(fn, args)
            row.update(ms=sec * 1e3, gbs=kv_bytes / sec / 1e9, peak_pct=100 * kv_bytes / sec / 1e9 / args.peak_gbs)
        except Exception as e:  # keep going: the table shows what failed
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row), flush=True)

    mask = "causal" if Nq > 1 else None
    record("mx.fast.sdpa (contiguous)", lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask))
    outputs["sdpa"] = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    spec = _spec(q, contiguous, scale, True, None, None, None, None)
    for tuning in TUNINGS:
        record(f"mfa {target} contiguous {_label(tuning)}",
               lambda t=tuning: native.decode(q, contiguous, spec, None, None, None, target, t)[0],
               tuning=dataclasses.asdict(tuning))
    outputs["native"] = decode_attention(q, contiguous, backend=target)
    record("mfa tiled (MLX ops) contiguous", lambda: decode_attention(q, contiguous, backend="tiled"))
    outputs["tiled"] = decode_attention(q, contiguous, backend="tiled")
    for page in args.pages:
        try:
            k_pool, v_pool, table = paged_copy(k, v, page, seed=page)
        except Exception as e:
            rows.append({"case": f"paged page={page}", "error": f"{type(e).__name__}: {e}"})
            continue
        paged = KVView.paged(k_pool, v_pool, table, N)
        for tuning in TUNINGS[:3]:
            record(f"mfa {target} paged page={page} {_label(tuning)}",
                   lambda t=tuning: native.decode(q, paged, spec, None, None, None, target, t)[0],
                   tuning=dataclasses.asdict(tuning), page=page)
        outputs[f"paged{page}"] = decode_attention(q, paged, backend=target)
        del k_pool, v_pool
    return {"rows": rows, "checks": _full_checks(outputs), "kv_bytes": kv_bytes}


def _label(t: native.Tuning) -> str:
    if t.mma:
        return f"[mma threads={t.threads} blocks={t.blocks}]"
    return f"[scalar threads={t.threads} steps={t.steps} rows={t.max_rows} blocks={t.blocks}]"


def _full_checks(outputs: dict) -> list:
    """Relative max errors of the full-size outputs against the tiled path (fp32 accumulation)."""
    checks = []
    ref = outputs.get("tiled")
    for name, out in outputs.items():
        if name == "tiled" or ref is None:
            continue
        try:
            checks.append({"check": f"{name} vs tiled (full size)", "rel_err": rel_err(out, ref)})
        except Exception as e:
            checks.append({"check": f"{name} vs tiled (full size)", "error": f"{type(e).__name__}: {e}"})
    return checks


SMALL = [  # (B, H, Hkv, Nq, N, D, dtype, page, options)
    (2, 8, 2, 1, 1000, 128, "bfloat16", 0, {}),
    (3, 32, 8, 4, 2049, 128, "bfloat16", 16, {"window": (700, 0)}),
    (2, 16, 2, 16, 777, 64, "float16", 64, {"softcap": 30.0}),
    (2, 8, 8, 2, 5000, 256, "bfloat16", 0, {"sinks": True, "alibi": True}),
    (4, 12, 4, 1, 3333, 64, "float32", 16, {"causal": False, "window": (100, 50)}),
    (1, 8, 1, 8, 65536, 128, "bfloat16", 256, {}),
]


def small_checks(target: str) -> list:
    """The kernel vs the tiled path on small shapes with every option; tolerance: bf16/fp16/fp32 rounding."""
    checks = []
    for i, (B, H, Hkv, Nq, N, D, dt, page, opts) in enumerate(SMALL):
        name = f"B={B} H={H} Hkv={Hkv} Nq={Nq} N={N} D={D} {dt} page={page} {sorted(opts)}"
        try:
            dtype = getattr(mx, dt)
            keys = mx.random.split(mx.random.key(100 + i), 4)
            q = mx.random.normal((B, H, Nq, D), key=keys[0]).astype(dtype)
            k = mx.random.normal((B, Hkv, N, D), key=keys[1]).astype(dtype)
            v = mx.random.normal((B, Hkv, N, D), key=keys[2]).astype(dtype)
            lens = np.random.default_rng(i).integers(Nq, N + 1, size=B)
            lens[0] = N
            options = dict(opts)
            if options.pop("sinks", False):
                options["sinks"] = mx.random.normal((H,), key=keys[3])
            if options.pop("alibi", False):
                options["alibi_slopes"] = mx.abs(mx.random.normal((B, H), key=keys[3])) * 0.01
            if page:
                k_pool, v_pool, table = paged_copy(k, v, page, seed=i)
                view = KVView.paged(k_pool, v_pool, table, lens)
            else:
                view = KVView.contiguous(k, v, lens)
            out, lse = decode_attention(q, view, backend=target, return_lse=True, **options)
            ref, ref_lse = decode_attention(q, KVView.contiguous(k, v, lens), backend="tiled", return_lse=True,
                                            **options)
            err, lse_err = rel_err(out, ref), mx.abs(lse - ref_lse).max().item()
            tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dt]
            checks.append({"check": name, "rel_err": err, "lse_abs_err": lse_err, "pass": err <= tol and lse_err < 1e-3})
        except Exception as e:
            checks.append({"check": name, "error": f"{type(e).__name__}: {e}", "pass": False})
            traceback.print_exc()
        print(json.dumps(checks[-1]), flush=True)
    return checks


def runtime_throughput(args) -> dict:
    """Tokens/s of `Runtime.generate` on the example model (random weights unless ``--checkpoint``)."""
    from mfa.nn import CausalLM, ModelConfig

    if args.checkpoint is not None:
        state = json.loads((args.checkpoint / "state.json").read_text())
        config = ModelConfig(**state["config"])
    else:  # examples/training/train.py --preset gpu
        config = ModelConfig(vocab_size=257, dims=512, num_layers=8, num_heads=8, num_kv_heads=8, mlp_dims=1536)
    model = CausalLM(config)
    if args.checkpoint is not None:
        model.load_weights(str(args.checkpoint / "model.safetensors"))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 256, size=256).tolist()
    prompts = [shared + rng.integers(0, 256, size=int(rng.integers(16, 512))).tolist() for _ in range(32)]
    results = {"config": dataclasses.asdict(config), "weights": str(args.checkpoint or "random")}
    for max_batch in (8, 32):
        rt = Runtime(model, num_pages=4096, page_size=16, prefill_chunk=512, max_batch=max_batch)
        rt.generate(prompts[:2], max_tokens=4, progress=False)  # warm-up: kernels built
        t0 = time.perf_counter()
        outs = rt.generate(prompts, max_tokens=128, progress=False)
        wall = time.perf_counter() - t0
        s = rt.stats
        results[f"max_batch={max_batch}"] = {
            "sequences": len(prompts), "generated_tokens": sum(len(o) for o in outs), "wall_s": wall,
            "tokens_per_s": sum(len(o) for o in outs) / wall, "decode_tokens_per_s": s.decode_tokens_per_s,
            "prefill_s": s.prefill_s, "prompt_tokens": s.prompt_tokens, "reused_prompt_tokens": s.reused_prompt_tokens,
            "peak_pages": s.peak_pages,
        }
        print(json.dumps(results[f"max_batch={max_batch}"]), flush=True)
    return results


def markdown(report: dict) -> str:
    lines = [f"# decode attention — {report['device']}", "", f"shape: {report['shape']}", "",
             "| case | ms | GB/s | % of peak | vs SDPA |", "|---|---|---|---|---|"]
    parts = {k: report.get(k) for k in ("bandwidth", "small_checks")}
    bandwidth_part = parts["bandwidth"] if isinstance(parts["bandwidth"], dict) else {}
    rows = bandwidth_part.get("rows", [])
    sdpa = next((r.get("ms") for r in rows if r["case"].startswith("mx.fast.sdpa")), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error'][:80]} | | | |")
            continue
        ratio = f"{sdpa / r['ms']:.2f}×" if sdpa else ""
        lines.append(f"| {r['case']} | {r['ms']:.3f} | {r['gbs']:.0f} | {r['peak_pct']:.1f}% | {ratio} |")
    lines += ["", "| check | result |", "|---|---|"]
    small = parts["small_checks"] if isinstance(parts["small_checks"], list) else []
    for c in bandwidth_part.get("checks", []) + small:
        lines.append(f"| {c['check']} | {json.dumps({k: v for k, v in c.items() if k != 'check'})} |")
    for part in ("bandwidth", "small_checks", "runtime", "error"):
        value = report.get(part)
        if isinstance(value, dict) and "error" in value:
            lines.append(f"\n{part} failed: {value['error']}")
        elif part == "error" and value:
            lines.append(f"\n{value}")
    if "runtime" in report:
        lines += ["", "runtime: " + json.dumps(report["runtime"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    target = native.gpu_target()
    report = {
        "device": f"{mx.default_device()} {target or 'no native target'} mlx {mx.__version__} {platform.node()}",
        "shape": f"B={args.batch} H={args.heads} Hkv={args.kv_heads} D={args.head_dim} N={args.cache} "
                 f"Nq={args.queries} {args.dtype}",
        "argv": sys.argv[1:],
    }
    if target is None:
        report["error"] = "no CUDA/Metal GPU: the native decode kernels need one"
    else:
        for part, fn in (("small_checks", lambda: small_checks(target)), ("bandwidth", lambda: bandwidth(args, target))):
            try:
                report[part] = fn()
            except Exception as e:
                report[part] = {"error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
    if not args.skip_runtime:
        try:
            report["runtime"] = runtime_throughput(args)
        except Exception as e:
            report["runtime"] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
    (args.out / "decode.json").write_text(json.dumps(report, indent=2))
    (args.out / "decode.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
