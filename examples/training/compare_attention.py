"""Train the same model with mfa attention and with MLX SDPA; compare tokens/s and peak memory.

    python examples/training/compare_attention.py --out runs/compare            # GPU preset, 30 steps each
    python examples/training/compare_attention.py --out runs/compare -- --steps 50 --batch-size 4

Each run is its own process (so peak memory is its own), ``train.py --preset gpu`` (8 layers,
512 dims, rows of 2048 tokens, bf16) with ``--attention mfa`` (packed varlen) or ``--attention sdpa``
(``mx.fast.scaled_dot_product_attention`` with a per-row document mask).  Arguments after ``--`` go
to both runs.  Writes ``OUT/{mfa,sdpa}/metrics.json``, ``OUT/compare.json`` and ``OUT/compare.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="gpu")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)

    results = {}
    for attention in ("mfa", "sdpa"):
        out = args.out / attention
        cmd = [sys.executable, str(HERE / "train.py"), "--preset", args.preset, "--attention", attention,
               "--steps", str(args.steps), "--eval-every", str(args.steps), "--sample-tokens", "0",
               "--out", str(out), *extra]
        print("$", " ".join(cmd), flush=True)
        run = subprocess.run(cmd)
        if run.returncode != 0:
            results[attention] = {"error": f"exit code {run.returncode}"}
            continue
        results[attention] = json.loads((out / "metrics.json").read_text())

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(results, indent=1))
    lines = ["| attention | tokens/s | peak memory (GB) | eval loss first -> last |", "|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | |")
        else:
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['peak_memory_gb']:.2f} | "
                         f"{r['first_eval_loss']:.3f} -> {r['final_eval_loss']:.3f} |")
    if all("error" not in r for r in results.values()):
        ratio = results["mfa"]["tokens_per_s"] / results["sdpa"]["tokens_per_s"]
        lines.append(f"\nmfa / sdpa tokens/s: {ratio:.2f}x on {results['mfa']['device']}")
    table = "\n".join(lines)
    (args.out / "compare.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
