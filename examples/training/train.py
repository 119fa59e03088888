"""Train a small byte-level causal LM through mfa on the tales corpus shipped in the repo.

    python examples/training/train.py                         # CPU defaults: a few minutes
    python examples/training/train.py --plot                  # also writes runs/train/loss.png
    python examples/training/train.py --resume                # continue from runs/train/checkpoint
    mlx.launch -n 2 --backend ring --python "$(which python)" examples/training/train.py   # data parallel
    python examples/training/train.py --preset gpu --attention sdpa   # the GPU comparison config

Documents are packed into fixed-size rows with ``cu_seqlens`` (see corpus.py), so no token ever
attends across a document boundary and no compute is spent on padding.  Prints a tqdm bar with the
loss and tokens/s, the eval loss, and a sample at the end; writes the checkpoint, ``metrics.json``
(and ``loss.png`` with ``--plot``) under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from corpus import DATA_DIR, VOCAB_SIZE, PackedRows, read_documents, split_documents
from trainer import load_checkpoint, make_optimizer, report, save_checkpoint, train

from mfa.nn import CausalLM, ModelConfig

PRESETS = {
    # a few minutes on a 2-core laptop CPU
    "cpu": dict(dims=128, layers=2, heads=4, kv_heads=2, mlp_dims=256, seq_len=256, batch_size=4, steps=150,
                lr=3e-3, warmup=30, eval_every=50, eval_rows=16, dtype="float32"),
    # the GPU comparison: 8 layers, 512 dims, 2048-token rows
    "gpu": dict(dims=512, layers=8, heads=8, kv_heads=8, mlp_dims=1536, seq_len=2048, batch_size=8, steps=200,
                lr=1e-3, warmup=50, eval_every=100, eval_rows=32, dtype="bfloat16"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for the flags below")
    p.add_argument("--data", type=Path, default=DATA_DIR / "tales.txt", help="corpus: documents split by blank lines")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="checkpoint, metrics.json, loss.png")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, help="rows per step per process")
    p.add_argument("--seq-len", type=int, help="tokens per row (the longest packed segment)")
    p.add_argument("--dims", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--mlp-dims", type=int, help="SwiGLU hidden width")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-rows", type=int, help="held-out rows per eval")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="share of documents held out")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention", choices=["mfa", "sdpa"], default="mfa",
                   help="mfa (packed varlen) or the baseline: mx.fast.scaled_dot_product_attention + document mask")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="run each optimizer step as one mx.compile graph")
    p.add_argument("--plot", action="store_true", help="write OUT/loss.png")
    p.add_argument("--prompt", default="Once upon a time", help="prompt of the final sample")
    p.add_argument("--sample-tokens", type=int, default=300, help="bytes to sample at the end (0: none)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_model(config: ModelConfig, dtype: str, attention: str, seq_len: int) -> CausalLM:
    """The model in ``dtype``; ``attention="sdpa"`` swaps in the MLX-SDPA baseline layers."""
    model = CausalLM(config)
    if attention == "sdpa":
        from baseline import use_sdpa_attention

        use_sdpa_attention(model, seq_len)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def main(argv=None) -> dict:
    args = parse_args(argv)
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    log = print if rank == 0 else (lambda *a, **k: None)

    train_docs, eval_docs = split_documents(read_documents(args.data), args.eval_fraction)
    train_rows = PackedRows(train_docs, args.seq_len, seed=args.seed)
    eval_rows = PackedRows(eval_docs, args.seq_len, shuffle=False)
    config = ModelConfig(vocab_size=VOCAB_SIZE, dims=args.dims, num_layers=args.layers, num_heads=args.heads,
                         num_kv_heads=args.kv_heads, mlp_dims=args.mlp_dims)
    mx.random.seed(args.seed)  # every rank starts from the same weights
    model = build_model(config, args.dtype, args.attention, args.seq_len)
    optimizer = make_optimizer(args.lr, args.steps, args.warmup, args.weight_decay)
    history = {"train": [], "eval": []}
    start = 0
    ckpt = args.out / "checkpoint"
    if args.resume:
        state = load_checkpoint(ckpt, model, optimizer)
        start, history = state["step"], state["history"]
        log(f"resumed from {ckpt} at step {start}")

    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"model: {n_params / 1e6:.2f}M parameters, {config}")
    log(f"data: {args.data.name}, {train_rows.num_tokens:,} training tokens/epoch, "
        f"{args.batch_size * args.seq_len * world:,} tokens/step over {world} process(es), attention={args.attention}")

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt, model, optimizer, {"step": step, "history": history, "config": dataclasses.asdict(config),
                                                 "args": {k: str(v) for k, v in vars(args).items()}})

    mx.reset_peak_memory()
    tic, step_times = time.perf_counter(), []
    train(model, optimizer, train_rows, eval_rows, steps=args.steps, batch_size=args.batch_size,
          eval_every=args.eval_every, eval_rows_max=args.eval_rows, grad_clip=args.grad_clip, group=group,
          history=history, start_step=start, checkpoint=checkpoint, checkpoint_every=args.checkpoint_every,
          step_times=step_times, compile_step=args.compile)
    elapsed = time.perf_counter() - tic

    steady = step_times[len(step_times) // 5 :] or step_times  # skip warm-up steps
    metrics = {
        "attention": args.attention, "device": str(mx.default_device()), "world": world, "dtype": args.dtype,
        "config": dataclasses.asdict(config), "seq_len": args.seq_len, "batch_size": args.batch_size,
        "steps": args.steps, "first_eval_loss": history["eval"][0][1], "final_eval_loss": history["eval"][-1][1],
        "tokens_per_s": args.batch_size * args.seq_len * world / float(np.median(steady)) if steady else None,
        "peak_memory_gb": mx.get_peak_memory() / 1e9, "train_seconds": elapsed,
    }
    first, last = metrics["first_eval_loss"], metrics["final_eval_loss"]
    log(f"eval loss {first:.3f} -> {last:.3f} ({100 * (1 - last / first):.0f}% lower) in {elapsed:.0f}s; "
        f"{metrics['tokens_per_s'] or 0:,.0f} tokens/s, peak memory {metrics['peak_memory_gb']:.2f} GB")
    report(args, metrics, history, model, f"{args.data.name}: {n_params / 1e6:.2f}M params", rank)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
