"""LoRA-fine-tune an mlx-lm model with its attention running through mfa (the model's code unchanged).

    pip install mlx-lm
    python examples/training/finetune_mlx_lm.py --model path/to/mlx-model          # a local mlx-lm model
    python examples/training/finetune_mlx_lm.py --model path/to/mlx-model --no-mfa # the stock run, to compare

``mfa.installed()`` routes ``mx.fast.scaled_dot_product_attention`` (which every mlx-lm model calls)
to ``mfa.scaled_dot_product_attention``: same loss, same gradients, mfa's O(N)-memory backward.
Adapters are saved in mlx-lm's format: ``mlx_lm.load(model, adapter_path=OUT)`` loads them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from corpus import DATA_DIR, read_documents, split_documents

import mfa


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local directory of an mlx-lm model (config, weights, tokenizer)")
    p.add_argument("--data", type=Path, default=DATA_DIR / "recipes.txt")
    p.add_argument("--out", type=Path, default=Path("runs/finetune_mlx_lm"), help="adapters.safetensors + adapter_config.json")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=20.0, help="mlx-lm's LoRA scale")
    p.add_argument("--lora-layers", type=int, default=-1, help="adapt the last N blocks (-1: all)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512, help="documents are cut to this many tokens")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-docs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mfa", action="store_true", help="stock mx.fast.scaled_dot_product_attention")
    return p.parse_args(argv)


def add_lora(model: nn.Module, rank: int, scale: float, num_layers: int) -> dict:
    """Freeze ``model`` and add mlx-lm LoRA layers; returns the mlx-lm adapter config."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    num_layers = len(model.layers) if num_layers < 0 else num_layers
    config = {"fine_tune_type": "lora", "num_layers": num_layers,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0}}
    model.freeze()
    linear_to_lora_layers(model, num_layers, config["lora_parameters"])
    return config


def tokenize(tokenizer, docs: List[str], max_length: int) -> List[np.ndarray]:
    """Token ids of each document, EOS appended, cut to ``max_length + 1`` (inputs plus the last target)."""
    eos = tokenizer.eos_token_id
    return [np.array((tokenizer.encode(d) + [eos])[: max_length + 1], dtype=np.int32) for d in docs]


def pad_batch(seqs: List[np.ndarray]) -> Tuple[mx.array, mx.array, mx.array]:
    """``(inputs, targets, lengths)`` of a right-padded batch of sequences."""
    lengths = np.array([len(s) - 1 for s in seqs], dtype=np.int32)
    width = int(lengths.max())
    tokens = np.zeros((len(seqs), width + 1), dtype=np.int32)
    for row, s in zip(tokens, seqs):
        row[: len(s)] = s
    return mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(lengths)


def loss_fn(model: nn.Module, inputs: mx.array, targets: mx.array, lengths: mx.array) -> mx.array:
    """Mean next-token cross-entropy over the unpadded positions."""
    logits = model(inputs).astype(mx.float32)
    mask = mx.arange(inputs.shape[1])[None, :] < lengths[:, None]
    losses = nn.losses.cross_entropy(logits, targets) * mask
    return losses.sum() / mask.sum()


def eval_loss(model: nn.Module, seqs: List[np.ndarray], batch_size: int) -> float:
    """Token-weighted mean loss over ``seqs``."""
    total = count = 0.0
    for i in range(0, len(seqs), batch_size):
        inputs, targets, lengths = pad_batch(seqs[i : i + batch_size])
        n = lengths.sum().item()
        total += loss_fn(model, inputs, targets, lengths).item() * n
        count += n
    return total / count


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mlx_lm import load

    model, tokenizer = load(args.model)
    mx.random.seed(args.seed)
    adapter_config = add_lora(model, args.lora_rank, args.lora_scale, args.lora_layers)
    train_docs, eval_docs = split_documents(read_documents(args.data), 0.05)
    train_seqs = tokenize(tokenizer, train_docs, args.max_length)
    eval_seqs = tokenize(tokenizer, eval_docs[: args.eval_docs], args.max_length)
    optimizer = optim.Adam(learning_rate=args.lr)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    rng = np.random.default_rng(args.seed)

    attention = contextlib.nullcontext() if args.no_mfa else mfa.installed()
    with attention:
        before = eval_loss(model, eval_seqs, args.batch_size)
        print(f"attention: {'mx.fast.scaled_dot_product_attention' if args.no_mfa else 'mfa'}; eval loss {before:.4f}")
        bar = tqdm(range(args.steps), unit="step", dynamic_ncols=True)
        for _ in bar:
            batch = pad_batch([train_seqs[i] for i in rng.choice(len(train_seqs), args.batch_size, replace=False)])
            loss, grads = value_and_grad(model, *batch)
            optimizer.update(model, grads)
            mx.eval(loss, model.trainable_parameters(), optimizer.state)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        after = eval_loss(model, eval_seqs, args.batch_size)
    print(f"eval loss on {args.data.name}: before {before:.4f} -> after {after:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(args.out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (args.out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1))
    print(f"wrote {args.out / 'adapters.safetensors'}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main(sys.argv[1:])
