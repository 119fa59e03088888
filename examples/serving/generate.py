"""Generate text from a trained `mfa.nn.CausalLM` checkpoint with `mfa.serving.Runtime`.

The prompts run together: chunked prefill, continuous batching over a paged KV cache, identical prompt
prefixes sharing pages. Prints each continuation and the throughput.

    python examples/training/train.py                  # writes runs/train/checkpoint
    python examples/serving/generate.py                # prompts below, from that checkpoint
    python examples/serving/generate.py --prompt "The fox" --prompt "The old fox" --temperature 0.8
    python examples/serving/generate.py --random-init  # no checkpoint: random weights (a speed check)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import mlx.core as mx

from mfa.nn import CausalLM, ModelConfig
from mfa.serving import Runtime, make_sampler

EOS = 256  # the byte-level vocabulary of examples/training/corpus.py: bytes 0-255, EOS 256
PROMPTS = [
    "Once upon a time",
    "Once upon a time, a fox",
    "Once upon a time, a fox and a crow",
    "The old tortoise said",
]


def encode(text: str) -> list:
    """``[EOS] + utf-8 bytes`` (how the training corpus starts every document)."""
    return [EOS] + list(text.encode("utf-8"))


def decode(tokens) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("runs/train/checkpoint"),
                   help="a train.py checkpoint (model.safetensors + state.json)")
    p.add_argument("--random-init", action="store_true", help="random weights of the cpu preset, no checkpoint")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a few shared-prefix ones")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--num-pages", type=int, default=512)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens per forward pass")
    p.add_argument("--no-prefix-reuse", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    p.add_argument("--out", type=Path, help="also write OUT/generate.json (texts and throughput)")
    return p.parse_args(argv)


def load_model(args) -> CausalLM:
    """The checkpoint's model (or a random one with the training example's cpu preset)."""
    if args.random_init:
        config = ModelConfig(vocab_size=EOS + 1, dims=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dims=256)
        model = CausalLM(config)
    else:
        state_file = args.checkpoint / "state.json"
        if not state_file.exists():
            raise SystemExit(f"no checkpoint at {args.checkpoint}: run examples/training/train.py or pass --random-init")
        config = ModelConfig(**json.loads(state_file.read_text())["config"])
        model = CausalLM(config)
        model.load_weights(str(args.checkpoint / "model.safetensors"))
    if args.dtype:
        model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    return model


def main(argv=None) -> dict:
    args = parse_args(argv)
    mx.random.seed(args.seed)
    model = load_model(args)
    prompts = args.prompt or PROMPTS
    runtime = Runtime(model, num_pages=args.num_pages, page_size=args.page_size, prefill_chunk=args.prefill_chunk,
                      max_batch=args.max_batch, prefix_reuse=not args.no_prefix_reuse)
    t0 = time.perf_counter()
    outputs = runtime.generate([encode(p) for p in prompts], max_tokens=args.max_tokens,
                               sampler=make_sampler(args.temperature, top_p=args.top_p), eos_token=EOS)
    wall = time.perf_counter() - t0
    for prompt, tokens in zip(prompts, outputs):
        print(f"\n--- {prompt!r}\n{prompt}{decode(tokens)}")
    s = runtime.stats
    report = {
        "device": str(mx.default_device()),
        "config": dataclasses.asdict(model.config),
        "texts": [p + decode(t) for p, t in zip(prompts, outputs)],
        "generated_tokens": s.generated_tokens,
        "wall_s": wall,
        "tokens_per_s": s.generated_tokens / wall,
        "decode_tokens_per_s": s.decode_tokens_per_s,
        "prompt_tokens": s.prompt_tokens,
        "reused_prompt_tokens": s.reused_prompt_tokens,
        "peak_pages": s.peak_pages,
    }
    print(f"\n{s.generated_tokens} tokens in {wall:.2f} s: {report['tokens_per_s']:.1f} tokens/s "
          f"(decode steps {s.decode_tokens_per_s:.1f} tokens/s); prompt tokens {s.prompt_tokens}, "
          f"{s.reused_prompt_tokens} reused from shared prefixes; peak pages {s.peak_pages}/{args.num_pages}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "generate.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
