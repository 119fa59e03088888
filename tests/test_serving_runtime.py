"""Runtime with mfa.nn.CausalLM: chunked prefill, continuous batching, prefix reuse, errors."""

import mlx.core as mx
import pytest

from mfa.nn.model import CausalLM, ModelConfig
from mfa.serving import PoolFullError, Runtime, make_sampler


def _model(**overrides):
    mx.random.seed(0)
    config = dict(vocab_size=61, dims=32, num_layers=2, num_heads=4, num_kv_heads=2)
    config.update(overrides)
    model = CausalLM(ModelConfig(**config))
    mx.eval(model.parameters())
    return model


def _recompute(model, prompt, n):
    """Greedy tokens from full forward passes over the whole sequence (no cache)."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(mx.argmax(model(mx.array([tokens]))[0, -1])))
    return tokens[len(prompt) :]


PROMPTS = [
    list(range(1, 40)),  # longer than a prefill chunk: chunked, flash_attention over pages
    list(range(1, 21)) + [50, 51, 52],  # shares 20 tokens (5 pages) with the first
    [7, 7, 7],
    [9],
]


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def expected(model):
    return [_recompute(model, p, 5) for p in PROMPTS]


@pytest.mark.parametrize("prefill_chunk", [3, 17, 256])
def test_generate_matches_recompute(model, expected, prefill_chunk):
    rt = Runtime(model, num_pages=64, page_size=4, prefill_chunk=prefill_chunk, max_batch=4)
    assert rt.generate(PROMPTS, max_tokens=5, progress=False) == expected


def test_continuous_batching_equals_running_alone(model, expected):
    rt = Runtime(model, num_pages=64, page_size=4, max_batch=2, prefix_reuse=False)
    together = rt.generate(PROMPTS, max_tokens=5, progress=False)
    alone = [Runtime(model, num_pages=64, page_size=4).generate([p], max_tokens=5, progress=False)[0] for p in PROMPTS]
    assert together == alone == expected
    assert rt.cache.pool.num_free == 64  # every sequence released its pages


def test_prefix_sharing_same_tokens_fewer_pages(model, expected):
    prompts = [PROMPTS[0], PROMPTS[0][:30] + [3, 4], PROMPTS[0]]
    shared = Runtime(model, num_pages=64, page_size=4, max_batch=3, prefix_reuse=True)
    plain = Runtime(model, num_pages=64, page_size=4, max_batch=3, prefix_reuse=False)
    out_shared = shared.generate(prompts, max_tokens=5, progress=False)
    out_plain = plain.generate(prompts, max_tokens=5, progress=False)
    assert out_shared == out_plain
    assert out_shared[0] == out_shared[2] == expected[0]
    # prompt 2 reuses 7 pages (28 tokens), prompt 3 all 9 full pages of prompt[:-1] (36 tokens)
    assert shared.stats.reused_prompt_tokens == 28 + 36
    assert shared.stats.peak_pages < plain.stats.peak_pages


def test_eos_stops_a_sequence(model, expected):
    eos = expected[0][2]
    rt = Runtime(model, num_pages=64, page_size=4)
    out = rt.generate(PROMPTS[:1], max_tokens=5, eos_token=eos, progress=False)
    assert out[0] == expected[0][: expected[0].index(eos) + 1]


def test_prefill_step_release(model, expected):
    rt = Runtime(model, num_pages=32, page_size=4)
    seqs, tokens = [], []
    for prompt in PROMPTS[2:]:
        seq, logits = rt.prefill(prompt)
        seqs.append(seq)
        tokens.append(int(mx.argmax(logits)))
    for _ in range(4):
        logits = rt.step(seqs, tokens)
        tokens = mx.argmax(logits, axis=-1).tolist()
    assert tokens == [expected[2][4], expected[3][4]]
    for seq in seqs:
        rt.release(seq)
    assert rt.cache.pool.num_free == 32 - rt.prefix.num_pages


def test_sliding_window_model():
    model = _model(window=(5, 0))
    prompt = list(range(2, 30))
    rt = Runtime(model, num_pages=32, page_size=4, prefill_chunk=8)
    assert rt.generate([prompt], max_tokens=4, progress=False)[0] == _recompute(model, prompt, 4)


def test_sampler_runs_and_respects_vocab(model):
    mx.random.seed(3)
    rt = Runtime(model, num_pages=32, page_size=4)
    out = rt.generate([[1, 2, 3]], max_tokens=6, sampler=make_sampler(temperature=0.8, top_p=0.9, top_k=20),
                      progress=False)
    assert len(out[0]) == 6 and all(0 <= t < 61 for t in out[0])


def test_pool_too_small_for_a_prompt_raises(model):
    rt = Runtime(model, num_pages=4, page_size=4)
    with pytest.raises(PoolFullError, match="does not fit"):
        rt.generate([list(range(30))], max_tokens=2, progress=False)
    with pytest.raises(ValueError, match="at least one token"):
        rt.prefill([])
    with pytest.raises(ValueError, match="max_tokens"):
        rt.generate([[1]], max_tokens=0, progress=False)


def test_pool_pressure_queues_sequences(model, expected):
    # the first prompt's generation needs 11 of the 13 pages: the next waits until it finishes
    rt = Runtime(model, num_pages=13, page_size=4, max_batch=4, prefix_reuse=False)
    assert rt.generate(PROMPTS, max_tokens=5, progress=False) == expected
    assert rt.stats.peak_pages <= 13


def test_generate_example_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "serving" / "generate.py"
    spec = importlib.util.spec_from_file_location("serving_generate", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main(["--random-init", "--max-tokens", "6", "--out", str(tmp_path)])
    assert len(report["texts"]) == len(example.PROMPTS) and report["reused_prompt_tokens"] > 0
    assert (tmp_path / "generate.json").exists()
