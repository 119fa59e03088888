"""Fine-tune a train.py checkpoint on a different corpus (recipes), fully or with LoRA.

    python examples/training/train.py                          # first: the base model
    python examples/training/finetune.py                       # full fine-tune on recipes.txt
    python examples/training/finetune.py --lora-rank 8         # LoRA adapters only
    mlx.launch -n 2 --backend ring --python "$(which python)" examples/training/finetune.py --lora-rank 8

Reports the eval loss on the new corpus before and after, and samples a recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from corpus import DATA_DIR, PackedRows, read_documents, split_documents
from trainer import load_checkpoint, make_optimizer, report, save_checkpoint, train

from mfa.nn import CausalLM, ModelConfig, apply_lora


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=Path("runs/train/checkpoint"), help="train.py checkpoint to start from")
    p.add_argument("--data", type=Path, default=DATA_DIR / "recipes.txt", help="the fine-tuning corpus")
    p.add_argument("--out", type=Path, default=Path("runs/finetune"), help="checkpoint, metrics.json, loss.png")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tune)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA update scale is alpha / rank")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4, help="rows per step per process")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 full, 5e-3 LoRA)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="run each optimizer step as one mx.compile graph")
    p.add_argument("--plot", action="store_true", help="write OUT/loss.png")
    p.add_argument("--prompt", default="Winter Apple Cake\n", help="prompt of the final sample")
    p.add_argument("--sample-tokens", type=int, default=300)
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 5e-3 if args.lora_rank else 1e-3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    log = print if rank == 0 else (lambda *a, **k: None)
    if not (args.base / "model.safetensors").exists():
        raise SystemExit(f"no checkpoint at {args.base}: run examples/training/train.py first (or pass --base)")

    base_state = json.loads((args.base / "state.json").read_text())
    config = ModelConfig(**base_state["config"])
    model = CausalLM(config)
    model.load_weights(str(args.base / "model.safetensors"))
    model.set_dtype(mx.float32)
    mx.random.seed(args.seed)  # identical adapters on every rank
    if args.lora_rank:
        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)
    mx.eval(model.parameters())
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    log(f"fine-tuning {trainable / 1e6:.3f}M parameters ({'LoRA rank %d' % args.lora_rank if args.lora_rank else 'full'})")

    train_docs, eval_docs = split_documents(read_documents(args.data), args.eval_fraction)
    train_rows = PackedRows(train_docs, args.seq_len, seed=args.seed)
    eval_rows = PackedRows(eval_docs, args.seq_len, shuffle=False)
    optimizer = make_optimizer(args.lr, args.steps, args.warmup, args.weight_decay)
    history = {"train": [], "eval": []}
    start, ckpt = 0, args.out / "checkpoint"
    if args.resume:
        state = load_checkpoint(ckpt, model, optimizer)
        start, history = state["step"], state["history"]
        log(f"resumed from {ckpt} at step {start}")

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt, model, optimizer, {"step": step, "history": history, "config": dataclasses.asdict(config),
                                                 "lora_rank": args.lora_rank})

    train(model, optimizer, train_rows, eval_rows, steps=args.steps, batch_size=args.batch_size,
          eval_every=args.eval_every, eval_rows_max=args.eval_rows, grad_clip=args.grad_clip, group=group,
          history=history, start_step=start, checkpoint=checkpoint, compile_step=args.compile)
    before, after = history["eval"][0][1], history["eval"][-1][1]
    log(f"eval loss on {args.data.name}: before {before:.4f} -> after {after:.4f}")
    metrics = {"before": before, "after": after, "lora_rank": args.lora_rank, "steps": args.steps, "world": world}
    report(args, metrics, history, model, f"fine-tuning on {args.data.name}", rank)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
