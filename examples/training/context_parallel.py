"""Context-parallel training: each row's sequence is split across the ranks, attention runs as a ring.

Every rank holds ``seq_len / W`` positions of each row (zig-zag order: the causal work is equal on
every rank), embeds them, rotates queries and keys at their *global* positions, and attends with
`mfa.distributed.ring_attention`: K/V slices travel around the ranks, so no rank ever holds the
whole sequence's activations.  Each rank's loss covers its own positions; the sum over ranks is the
loss of the whole row, and so are the summed parameter gradients (checked against one process
running the whole sequence with ``--check``).

    # CPU, 2 local processes
    mlx.launch -n 2 --backend ring --python "$(which python)" examples/training/context_parallel.py --check
    # 2 GPUs (MLX's NCCL backend; ring_attention gathers K/V with all_gather there)
    mlx.launch -n 2 --backend nccl --python "$(which python)" examples/training/context_parallel.py --preset gpu

The model is a small byte-level causal LM trained on ``examples/data/tales.txt`` read as one long
stream (documents separated by EOS; attention runs across them, as in long-context pretraining).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import corpus  # noqa: E402

import mfa  # noqa: E402
import mfa.distributed as md  # noqa: E402
from mfa.nn.transformer import SwiGLU  # noqa: E402

PRESETS = {
    "cpu": dict(dims=128, layers=2, heads=4, kv_heads=2, seq_len=1024, batch_size=1, steps=30, lr=3e-3,
                dtype="float32"),
    "gpu": dict(dims=1024, layers=8, heads=8, kv_heads=8, seq_len=65536, batch_size=1, steps=50, lr=1e-3,
                dtype="bfloat16"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for the flags below")
    for name in ("dims", "layers", "heads", "kv_heads", "seq_len", "batch_size", "steps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--layout", choices=md.LAYOUTS, default="zigzag")
    p.add_argument("--comm", choices=("auto", "ring", "all_gather"), default="auto")
    p.add_argument("--check", action="store_true",
                   help="first check the context-parallel loss and gradients against the whole sequence on one rank")
    p.add_argument("--out", type=Path, default=Path("runs/context_parallel"), help="metrics.json goes here")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def rope(x: mx.array, positions: mx.array) -> mx.array:
    """RoPE of ``x (B, H, n, D)`` at arbitrary token ``positions (n,)``: tokens as a batch of 1-long rows."""
    B, H, n, D = x.shape
    rows = x.transpose(2, 0, 1, 3).reshape(n, B * H, 1, D)
    rows = mx.fast.rope(rows, D, traditional=False, base=10000.0, scale=1.0, offset=positions)
    return rows.reshape(n, B, H, D).transpose(1, 2, 0, 3)


class Attention(nn.Module):
    """Causal GQA self-attention over a sequence sharded across ``group`` (or whole, without one)."""

    def __init__(self, dims: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dims // heads
        self.q_proj = nn.Linear(dims, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dims, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dims, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dims, bias=False)

    def __call__(self, x: mx.array, positions: mx.array, context) -> mx.array:
        B, n, _ = x.shape
        q = self.q_proj(x).reshape(B, n, self.heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, n, self.kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, n, self.kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = rope(q, positions), rope(k, positions)
        if context is None:  # the whole sequence on this rank
            out = mfa.flash_attention(q, k, v, causal=True)
        else:
            group, layout, comm = context
            out = md.ring_attention(q, k, v, group, causal=True, layout=layout, comm=comm)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, n, -1))


class Block(nn.Module):
    def __init__(self, dims: int, heads: int, kv_heads: int):
        super().__init__()
        self.attention_norm, self.mlp_norm = nn.RMSNorm(dims), nn.RMSNorm(dims)
        self.attention = Attention(dims, heads, kv_heads)
        self.mlp = SwiGLU(dims, 4 * dims)

    def __call__(self, x, positions, context):
        h = x + self.attention(self.attention_norm(x), positions, context)
        return h + self.mlp(self.mlp_norm(h))


class LM(nn.Module):
    """Byte-level causal LM whose attention layers run context-parallel."""

    def __init__(self, dims: int, layers: int, heads: int, kv_heads: int):
        super().__init__()
        self.embed = nn.Embedding(corpus.VOCAB_SIZE, dims)
        self.blocks = [Block(dims, heads, kv_heads) for _ in range(layers)]
        self.norm = nn.RMSNorm(dims)
        self.head = nn.Linear(dims, corpus.VOCAB_SIZE, bias=False)

    def __call__(self, tokens: mx.array, positions: mx.array, context=None) -> mx.array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, positions, context)
        return self.head(self.norm(x))


def loss_sum(model: LM, inputs, targets, positions, context, total: int) -> mx.array:
    """This rank's share of the row's mean cross-entropy: sum over its positions / all positions."""
    logits = model(inputs, positions, context).astype(mx.float32)
    return nn.losses.cross_entropy(logits, targets, reduction="sum") / total


def all_sum(tree, group):
    """Sum every array of ``tree`` over the ranks (gradients of the per-rank loss shares)."""
    if group.size() == 1:
        return tree
    return tree_map(lambda g: mx.distributed.all_sum(g, group=group), tree)


def check(model, rows, group, args) -> dict:
    """The context-parallel loss and gradients vs one rank running the whole sequence."""
    inputs, targets = rows
    rank, world = group.rank(), group.size()
    total = targets.size
    full_positions = mx.arange(args.seq_len, dtype=mx.int32)
    grad_fn = nn.value_and_grad(model, loss_sum)
    loss_full, grads_full = grad_fn(model, inputs, targets, full_positions, None, total)
    mx.eval(loss_full, grads_full)
    local = [md.shard(x, rank, world, layout=args.layout, axis=1) for x in (inputs, targets)]
    positions = md.positions(args.seq_len // world, rank, world, layout=args.layout)
    loss_cp, grads_cp = grad_fn(model, *local, positions, (group, args.layout, args.comm), total)
    mx.eval(loss_cp, grads_cp)  # the ring's messages complete before the gradient sums start
    loss_cp, grads_cp = all_sum(loss_cp, group), all_sum(grads_cp, group)
    full, cp = dict(tree_flatten(grads_full)), dict(tree_flatten(grads_cp))
    scale = max(float(mx.abs(g).max()) for g in full.values())
    diff = max(float(mx.abs(full[name] - cp[name]).max()) for name in full)
    return {"loss_full": float(loss_full), "loss_context_parallel": float(loss_cp),
            "max_grad_diff": diff, "max_grad": scale}


def main(argv=None) -> dict:
    args = parse_args(argv)
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    if args.seq_len % (2 * world):
        raise ValueError(f"--seq-len {args.seq_len} must be divisible by {2 * world} (zig-zag over {world} ranks)")
    dtype = getattr(mx, args.dtype)
    mx.random.seed(0)  # the same initial weights on every rank
    model = LM(args.dims, args.layers, args.heads, args.kv_heads)
    model.set_dtype(dtype)
    data = corpus.PackedRows(corpus.read_documents(corpus.DATA_DIR / "tales.txt"), args.seq_len, seed=0)

    def rows(step: int):
        indices = corpus.step_rows(step, args.batch_size)  # every rank reads the same rows
        inputs, targets = zip(*(data.row(i)[:2] for i in indices))
        return mx.array(np.stack(inputs)), mx.array(np.stack(targets))

    metrics = {"world": world, "layout": args.layout, "config": {k: str(v) for k, v in vars(args).items()}}
    if args.check:
        metrics["check"] = check(model, rows(0), group, args)
        if rank == 0:
            print("check:", json.dumps(metrics["check"]), flush=True)

    n_local = args.seq_len // world
    positions = md.positions(n_local, rank, world, layout=args.layout)
    context = (group, args.layout, args.comm)
    optimizer = optim.AdamW(learning_rate=args.lr)
    grad_fn = nn.value_and_grad(model, loss_sum)
    losses, start = [], time.perf_counter()
    bar = tqdm(range(args.steps), disable=rank != 0, desc=f"context parallel x{world}")
    for step in bar:
        inputs, targets = rows(step)
        local = [md.shard(x, rank, world, layout=args.layout, axis=1) for x in (inputs, targets)]
        loss, grads = grad_fn(model, *local, positions, context, targets.size)
        mx.eval(loss, grads)  # finish the ring's messages before the gradient sums use the same links
        loss, grads = all_sum(loss, group), all_sum(grads, group)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        losses.append(float(loss))
        tokens_per_s = (step + 1) * targets.size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_s:.0f}")
    elapsed = time.perf_counter() - start
    metrics.update(losses=losses, tokens_per_s=args.steps * args.batch_size * args.seq_len / elapsed)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {metrics['tokens_per_s']:.0f} tokens/s over {world} ranks")
    return metrics


if __name__ == "__main__":
    main()
