"""`Runtime`: generation from a causal LM over a paged KV cache.

* chunked prefill: a prompt runs through the model ``prefill_chunk`` tokens at a time, so memory for
  activations stays fixed however long the prompt;
* continuous batching: `generate` decodes up to ``max_batch`` sequences of different lengths together;
  finished sequences leave and waiting prompts join between steps;
* prefix reuse: identical page-aligned prompt prefixes share pages (`PrefixCache`) and are not recomputed.

Model protocol: ``model(tokens (B, S) int32, cache=layers) -> logits (B, S, V)``, where ``layers`` holds one
cache per layer; an attention layer rotates q/k by ``cache.offset`` (an int, or ``(B,)`` int32 positions) and
calls ``cache.attend(q, k, v, scale=...)`` (see `attend.py`). ``num_layers`` defaults to
``len(model.layers)``.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
from tqdm import tqdm

from mfa.serving.paged import PagedKVCache
from mfa.serving.pool import PoolFullError
from mfa.serving.prefix import PrefixCache
from mfa.serving.sampling import Sampler, greedy


@dataclasses.dataclass
class GenerationStats:
    """Counters of the last `Runtime.generate` call."""

    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_pages: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0


@dataclasses.dataclass
class _Active:
    index: int
    prompt_len: int
    out: List[int]
    max_tokens: int


class Runtime:
    """Serve a causal LM: chunked prefill, batched decode steps, prefix reuse, `generate`.

    Args:
        model: ``model(tokens (B, S), cache=layers) -> logits (B, S, V)`` (see the module docstring).
        num_pages: pages in the KV pool. Default: ``1024``.
        page_size: tokens per page. Default: ``16``.
        num_layers: model layers. Default: ``len(model.layers)``.
        prefill_chunk: prompt tokens per forward pass. Default: ``256``.
        max_batch: sequences decoded together by `generate`. Default: ``8``.
        prefix_reuse: share pages of identical prompt prefixes. Default: ``True``.
    """

    def __init__(self, model, *, num_pages: int = 1024, page_size: int = 16, num_layers: Optional[int] = None,
                 prefill_chunk: int = 256, max_batch: int = 8, prefix_reuse: bool = True):
        if prefill_chunk < 1 or max_batch < 1:
            raise ValueError(f"{prefill_chunk=} and {max_batch=} must be positive")
        self.model = model
        num_layers = len(model.layers) if num_layers is None else num_layers
        self.cache = PagedKVCache(num_pages, page_size, num_layers)
        self.prefix = PrefixCache(self.cache) if prefix_reuse else None
        self.prefill_chunk = prefill_chunk
        self.max_batch = max_batch
        self.stats = GenerationStats()

    def prefill(self, prompt: Sequence[int]) -> Tuple[int, mx.array]:
        """Start a sequence from ``prompt``: reuse cached prefix pages, run the rest in chunks.

        Args:
            prompt: token ids (at least one).

        Returns:
            ``(seq_id, logits (V,))``, the logits predicting the token after the prompt.
        """
        if len(prompt) == 0:
            raise ValueError("prompt must hold at least one token")
        shared = self.prefix.match(prompt) if self.prefix is not None else []
        seq = self.cache.add_sequence(shared)
        done = len(shared) * self.cache.page_size
        self.stats.prompt_tokens += len(prompt)
        self.stats.reused_prompt_tokens += done
        try:
            for start in range(done, len(prompt), self.prefill_chunk):
                chunk = list(prompt[start : start + self.prefill_chunk])
                logits = self._forward([seq], mx.array([chunk], dtype=mx.int32))
        except Exception:
            self.cache.free(seq)
            raise
        if self.prefix is not None:
            self.prefix.insert(prompt, self.cache.pages(seq))
        return seq, logits[0, -1]

    def step(self, seq_ids: Sequence[int], tokens) -> mx.array:
        """Append one token to each sequence and return the next-token logits.

        Args:
            seq_ids: ``B`` live sequences, each of any length.
            tokens: ``(B,)`` token ids.

        Returns:
            ``(B, V)`` logits.
        """
        tokens = mx.array(tokens, dtype=mx.int32).reshape(len(seq_ids), 1)
        return self._forward(list(seq_ids), tokens)[:, -1]

    def release(self, seq_id: int) -> None:
        """Free a finished sequence's pages (cached prefix pages stay with the prefix cache)."""
        self.cache.free(seq_id)

    def _forward(self, seq_ids: List[int], tokens: mx.array) -> mx.array:
        batch = self.cache.batch(seq_ids, tokens.shape[1])
        logits = self.model(tokens, cache=batch.layers)
        mx.eval(logits, *(x for x in (*self.cache.k_pages, *self.cache.v_pages) if x is not None))
        used = self.cache.pool.num_pages - self.cache.pool.num_free
        self.stats.peak_pages = max(self.stats.peak_pages, used)
        return logits

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int = 64, sampler: Optional[Sampler] = None,
                 eos_token: Optional[int] = None, progress: bool = True) -> List[List[int]]:
        """Generate up to ``max_tokens`` tokens for every prompt, decoding them in continuous batches.

        Sequences join as soon as a batch slot and enough pages for their whole generation are free, and
        leave when done; each sequence's tokens do not depend on which others share its batch.

        Args:
            prompts: token-id lists.
            max_tokens: tokens to generate per prompt (fewer if ``eos_token`` comes first).
            sampler: ``logits (B, V) -> tokens (B,)``. Default: greedy.
            eos_token: stop a sequence after it emits this token (which is kept).
            progress: show a tqdm bar of generated tokens.

        Returns:
            the generated tokens of each prompt, in order.
        """
        if max_tokens < 1:
            raise ValueError(f"{max_tokens=} must be positive")
        sampler = sampler or greedy
        self.stats = GenerationStats()
        waiting = collections.deque(enumerate(prompts))
        active: Dict[int, _Active] = {}
        results: List[Optional[List[int]]] = [None] * len(prompts)
        bar = tqdm(total=len(prompts) * max_tokens, disable=not progress, unit="tok", desc="generate")

        def emit(seq: int, token: int) -> None:
            state = active[seq]
            state.out.append(token)
            bar.update(1)
            if len(state.out) >= state.max_tokens or token == eos_token:
                bar.update(state.max_tokens - len(state.out))
                results[state.index] = state.out
                del active[seq]
                self.release(seq)

        with bar:
            while waiting or active:
                # admit: prefill waiting prompts while slots and pages allow
                while waiting and len(active) < self.max_batch and self._fits(waiting[0][1], max_tokens, active):
                    index, prompt = waiting.popleft()
                    t0 = time.perf_counter()
                    seq, logits = self.prefill(prompt)
                    token = int(sampler(logits[None])[0])
                    self.stats.prefill_s += time.perf_counter() - t0
                    active[seq] = _Active(index, len(prompt), [], max_tokens)
                    self.stats.generated_tokens += 1
                    emit(seq, token)
                if not active:
                    if waiting:
                        prompt = waiting[0][1]
                        raise PoolFullError(
                            f"a prompt of {len(prompt)} tokens plus {max_tokens} new ones does not fit in the pool "
                            f"({self.cache.pool.num_pages} pages of {self.cache.page_size})"
                        )
                    break
                # decode: one token for every active sequence
                t0 = time.perf_counter()
                seqs = list(active)
                tokens = sampler(self.step(seqs, [active[s].out[-1] for s in seqs])).tolist()
                self.stats.decode_s += time.perf_counter() - t0
                self.stats.generated_tokens += len(seqs)
                bar.set_postfix(batch=len(seqs), tok_s=f"{self.stats.decode_tokens_per_s:.1f}")
                for seq, token in zip(seqs, tokens):
                    emit(seq, int(token))
        return results

    def _fits(self, prompt: Sequence[int], max_tokens: int, active: Dict[int, _Active]) -> bool:
        """Whether the pool can hold this prompt's whole generation on top of the active ones' growth."""
        ps, pool = self.cache.page_size, self.cache.pool
        shared = self.prefix.match(prompt) if self.prefix is not None else []
        need = -(-(len(prompt) + max_tokens) // ps) - len(shared)
        for seq, state in active.items():
            final = state.prompt_len + state.max_tokens
            need += -(-final // ps) - len(self.cache.pages(seq))
        reclaimable = 0
        if self.prefix is not None:
            reclaimable = self.prefix.num_reclaimable(exclude=shared)
        return need <= pool.num_free + reclaimable
