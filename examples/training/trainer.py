"""The training loop shared by train.py and finetune.py: step, eval, checkpoints, data parallel, plots.

Data parallel: run the same script under ``mlx.launch -n N``.  Every rank builds the same model
(same seed), reads its own rows (`corpus.step_rows`), and averages gradients with
``mlx.nn.average_gradients`` before the (identical) optimizer update; rank 0 alone prints, writes
checkpoints and plots.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from corpus import EOS, Batch, PackedRows, bucket_segments, decode, step_rows

from mfa.serving import KVCache


def loss_fn(model: nn.Module, batch: Batch) -> mx.array:
    """Mean next-token cross-entropy over every packed position."""
    logits = model(batch.inputs, cu_seqlens=batch.cu_seqlens)
    return nn.losses.cross_entropy(logits.astype(mx.float32), batch.targets, reduction="mean")


def make_optimizer(lr: float, steps: int, warmup: int, weight_decay: float) -> optim.AdamW:
    """AdamW with linear warmup then cosine decay to ``lr / 10`` at ``steps``."""
    warmup = min(warmup, steps)
    decay = optim.cosine_decay(lr, max(steps - warmup, 1), end=lr / 10)
    schedule = optim.join_schedules([optim.linear_schedule(lr / 100, lr, warmup), decay], [warmup]) if warmup else decay
    return optim.AdamW(learning_rate=schedule, weight_decay=weight_decay)


def all_mean(x: mx.array, group: mx.distributed.Group) -> mx.array:
    """Mean of ``x`` over the ranks of ``group``."""
    return x if group.size() == 1 else mx.distributed.all_sum(x, group=group) / group.size()


def evaluate(model: nn.Module, rows: PackedRows, batch_size: int, max_rows: int, group: mx.distributed.Group) -> float:
    """Mean cross-entropy over the first ``max_rows`` rows of ``rows`` (split across ranks)."""
    n = min(max_rows, rows.rows_per_epoch)
    mine = list(range(group.rank(), n, group.size()))
    total, count = mx.array(0.0), mx.array(0.0)
    for i in range(0, len(mine), batch_size):
        batch = rows.batch(mine[i : i + batch_size])
        tokens = batch.inputs.size
        total = total + loss_fn(model, batch) * tokens
        count = count + tokens
        mx.eval(total, count)
    if group.size() > 1:
        total, count = mx.distributed.all_sum(total, group=group), mx.distributed.all_sum(count, group=group)
    return (total / count).item()


def save_checkpoint(path: Path, model: nn.Module, optimizer: optim.Optimizer, state: dict) -> None:
    """Write ``model.safetensors`` (trainable and frozen weights), ``optimizer.safetensors``, ``state.json``."""
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(path / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (path / "state.json").write_text(json.dumps(state, indent=1))


def load_checkpoint(path: Path, model: nn.Module, optimizer: Optional[optim.Optimizer] = None) -> dict:
    """Load what `save_checkpoint` wrote into ``model`` (and ``optimizer``); return the state dict."""
    model.load_weights(str(path / "model.safetensors"))
    if optimizer is not None:
        optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    return json.loads((path / "state.json").read_text())


def train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    train_rows: PackedRows,
    eval_rows: PackedRows,
    *,
    steps: int,
    batch_size: int,
    eval_every: int,
    eval_rows_max: int,
    grad_clip: float,
    group: mx.distributed.Group,
    history: Dict[str, List],
    start_step: int = 0,
    checkpoint: Optional[Callable[[int], None]] = None,
    checkpoint_every: int = 0,
    step_times: Optional[List[float]] = None,
    compile_step: bool = False,
) -> Dict[str, List]:
    """Run steps ``start_step .. steps-1``; append ``(step, loss)`` to ``history["train"]`` / ``["eval"]``.

    Evaluates before the first step of a fresh run, every ``eval_every`` steps and after the last.
    ``checkpoint(step)`` is called every ``checkpoint_every`` steps and at the end (rank 0 only).
    The seconds of each optimizer step are appended to ``step_times`` when given.
    ``compile_step``: run the step (forward, backward, gradient averaging, clipping and the
    optimizer update) as one `mx.compile` graph, traced once per batch shape (`bucket_segments`
    keeps those few): after the first steps no Python runs per layer.
    """
    rank, world = group.rank(), group.size()
    value_and_grad = nn.value_and_grad(model, loss_fn)

    def step(inputs: mx.array, targets: mx.array, cu_seqlens: mx.array):
        loss, grads = value_and_grad(model, Batch(inputs, targets, cu_seqlens))
        grads = nn.average_gradients(grads, group=group)
        grads, grad_norm = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return all_mean(loss, group), grad_norm

    if compile_step:
        # the traced step reads and writes the weights and the optimizer state (made first, so
        # that the trace sees every entry)
        optimizer.init(model.trainable_parameters())
        state = [model.state, optimizer.state, mx.random.state]
        step = mx.compile(step, inputs=state, outputs=state)
        if rank == 0 and mx.default_device() == mx.cpu:
            tqdm.write("note: --compile on a CPU is slower than eager steps (the tiled varlen attention "
                       "cannot skip other segments' tiles while cu_seqlens is traced)")

    def next_batch(s: int) -> Batch:
        batch = train_rows.batch(step_rows(s, batch_size, rank, world))
        return bucket_segments(batch) if compile_step else batch

    def run_eval(at: int):
        loss = evaluate(model, eval_rows, batch_size, eval_rows_max, group)
        history["eval"].append((at, loss))
        if rank == 0:
            tqdm.write(f"step {at:5d}  eval loss {loss:.4f}")

    if not history["eval"]:
        run_eval(start_step)
    tokens_per_step = batch_size * train_rows.seq_len * world
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, disable=rank != 0,
               unit="step", dynamic_ncols=True)
    for s in bar:
        tic = time.perf_counter()
        loss, grad_norm = step(*next_batch(s))
        mx.eval(loss, grad_norm, model.parameters(), optimizer.state)
        loss, seconds, done = loss.item(), time.perf_counter() - tic, s + 1
        if step_times is not None:
            step_times.append(seconds)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {done}")
        history["train"].append((done, loss))
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}",
                        lr=f"{optimizer.learning_rate.item():.2e}")
        if done % eval_every == 0 or done == steps:
            run_eval(done)
        if checkpoint is not None and rank == 0 and (done == steps or checkpoint_every and done % checkpoint_every == 0):
            checkpoint(done)
    bar.close()
    return history


def generate(model: nn.Module, prompt: str, max_tokens: int, temperature: float = 0.8, seed: int = 0) -> str:
    """Sample a continuation of ``prompt`` token by token through the layers' KV caches.

    Stops at EOS or after ``max_tokens`` bytes; ``temperature=0`` is greedy.
    """
    cache = [KVCache() for _ in model.layers]
    key = mx.random.key(seed)
    tokens = mx.array([[EOS] + list(prompt.encode("utf-8"))])
    out: List[int] = []
    for _ in range(max_tokens):
        logits = model(tokens, cache=cache)[:, -1, :].astype(mx.float32)
        if temperature == 0:
            nxt = mx.argmax(logits, axis=-1)
        else:
            key, sub = mx.random.split(key)
            nxt = mx.random.categorical(logits / temperature, key=sub)
        token = nxt.item()
        if token == EOS:
            break
        out.append(token)
        tokens = nxt[:, None]
    return prompt + decode(out)


def plot_losses(history: Dict[str, List], path: Path, title: str) -> None:
    """Write the train and eval loss curves to a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if history["train"]:
        s, loss = np.array(history["train"]).T
        ax.plot(s, loss, lw=1, alpha=0.8, label="train")
    if history["eval"]:
        s, loss = np.array(history["eval"]).T
        ax.plot(s, loss, "o-", lw=2, label="eval")
    ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(args, metrics: dict, history: Dict[str, List], model: nn.Module, title: str, rank: int) -> None:
    """Rank 0 writes ``metrics.json``, the loss plot (``--plot``) and a sample (``--sample-tokens``)."""
    if rank != 0:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if args.plot:
        plot_losses(history, args.out / "loss.png", title)
        print(f"wrote {args.out / 'loss.png'}")
    if args.sample_tokens:
        print("sample:\n" + generate(model, args.prompt, args.sample_tokens, seed=args.seed))
