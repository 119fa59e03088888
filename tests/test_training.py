"""examples/training: corpus packing, train/resume/fine-tune runs, the SDPA baseline, data parallel."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ROOT / "examples" / "training"
sys.path.insert(0, str(TRAINING))
sys.path.insert(0, str(ROOT / "examples" / "data"))
sys.path.insert(0, str(ROOT / "tests" / "distributed"))

import corpus  # noqa: E402
import finetune  # noqa: E402
from launch import launch  # noqa: E402
import make_corpus  # noqa: E402
import train  # noqa: E402
import trainer  # noqa: E402
from baseline import use_sdpa_attention  # noqa: E402

from mfa.nn import CausalLM, ModelConfig  # noqa: E402

TINY = ["--dims", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--mlp-dims", "64", "--seq-len", "64",
        "--batch-size", "2", "--eval-rows", "4", "--lr", "1e-2", "--warmup", "2", "--sample-tokens", "0"]


def weights(path: Path) -> dict:
    return mx.load(str(path / "checkpoint" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(np.array(a[name]), np.array(b[name]), rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("kind", ["tales", "recipes"])
def test_shipped_corpus_is_what_the_generator_writes(kind):
    text = (ROOT / "examples" / "data" / f"{kind}.txt").read_text(encoding="utf-8")
    assert text == make_corpus.build(kind)
    assert len(text.encode()) < 4_000_000
    assert "{" not in text  # every template slot was filled


def test_packed_rows_keep_documents_apart():
    docs = ["abc", "hello world", "x" * 40, "tail"]
    rows = corpus.PackedRows(docs, seq_len=8, seed=3)
    positions = sum(len(d) + 1 for d in docs)
    assert rows.rows_per_epoch == positions // 8
    for i in range(2 * rows.rows_per_epoch):  # two epochs
        inputs, targets, lengths = rows.row(i)
        assert len(inputs) == len(targets) == lengths.sum() == 8 and (lengths > 0).all()
        # inside a segment the target is the next input; a segment after the first starts a document
        starts = np.cumsum(lengths)[:-1]
        for t in range(7):
            if t + 1 not in starts:
                assert targets[t] == inputs[t + 1]
        assert all(inputs[s] == corpus.EOS for s in starts)
    batch = rows.batch([0, 1, 2])
    assert batch.inputs.shape == (1, 24) and batch.cu_seqlens[-1].item() == 24
    np.testing.assert_array_equal(np.array(batch.inputs[0, 8:16]), rows.row(1)[0])
    # a fixed seed gives the same rows; another epoch another order
    again = corpus.PackedRows(docs, seq_len=8, seed=3)
    np.testing.assert_array_equal(again.row(1)[0], rows.row(1)[0])
    epoch0 = np.concatenate([rows.row(i)[0] for i in range(rows.rows_per_epoch)])
    epoch1 = np.concatenate([rows.row(i)[0] for i in range(rows.rows_per_epoch, 2 * rows.rows_per_epoch)])
    assert not np.array_equal(epoch0, epoch1)
    assert corpus.decode(corpus.encode("héllo")) == "héllo"


def test_ranks_read_disjoint_rows_that_make_the_doubled_batch():
    for step in range(3):
        ranks = [list(corpus.step_rows(step, 2, rank, 2)) for rank in range(2)]
        assert ranks[0] + ranks[1] == list(corpus.step_rows(step, 4))


def test_sdpa_baseline_has_the_same_loss_and_grads():
    mx.random.seed(0)
    model = CausalLM(ModelConfig(dims=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dims=48))
    baseline = CausalLM(model.config)
    baseline.update(model.parameters())
    use_sdpa_attention(baseline, seq_len=32)
    rows = corpus.PackedRows(["a short one", "another document here", "x" * 50, "end"], seq_len=32)
    batch = rows.batch([0, 1])
    results = []
    for m in (model, baseline):
        loss, grads = nn.value_and_grad(m, trainer.loss_fn)(m, batch)
        mx.eval(loss, grads)
        results.append((loss.item(), dict(tree_flatten(grads))))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, g in results[0][1].items():
        np.testing.assert_allclose(np.array(g), np.array(results[1][1][name]), rtol=1e-4, atol=1e-5, err_msg=name)


def test_greedy_generation_matches_full_forward_argmax():
    mx.random.seed(1)
    model = CausalLM(ModelConfig(dims=32, num_layers=1, num_heads=2, mlp_dims=48))
    text = trainer.generate(model, "Once", max_tokens=6, temperature=0)
    tokens = [corpus.EOS] + list(b"Once")
    for _ in range(6):
        nxt = mx.argmax(model(mx.array([tokens]))[0, -1]).item()
        if nxt == corpus.EOS:
            break
        tokens.append(nxt)
    assert text == corpus.decode(tokens)


def test_train_lowers_eval_loss_and_resume_is_exact(tmp_path, monkeypatch):
    straight = train.main([*TINY, "--steps", "6", "--eval-every", "3", "--out", str(tmp_path / "a"), "--plot"])
    assert straight["final_eval_loss"] < 0.9 * straight["first_eval_loss"]
    assert (tmp_path / "a" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same run crashes right after its step-3 checkpoint, then resumes
    save = train.save_checkpoint

    def save_then_crash(path, model, optimizer, state):
        save(path, model, optimizer, state)
        if state["step"] == 3:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    args = [*TINY, "--steps", "6", "--eval-every", "3", "--out", str(tmp_path / "b"), "--checkpoint-every", "3"]
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    resumed = train.main([*args, "--resume"])
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"), 0)
    assert resumed["final_eval_loss"] == straight["final_eval_loss"]


def test_bucketed_segments_are_empty_and_change_nothing():
    rows = corpus.PackedRows(["abc", "hello world", "x" * 40, "tail", "more text"], seq_len=16, seed=1)
    batch = rows.batch([0, 1, 2])
    padded = corpus.bucket_segments(batch)
    n, size = batch.cu_seqlens.shape[0], padded.cu_seqlens.shape[0]
    assert n < size < 2 * n and size & (size - 1) == 0  # this batch needs padding
    cu = np.array(padded.cu_seqlens)
    assert (cu[:n] == np.array(batch.cu_seqlens)).all() and (cu[n:] == cu[n - 1]).all()
    model = CausalLM(ModelConfig(vocab_size=corpus.VOCAB_SIZE, dims=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                 mlp_dims=64))
    np.testing.assert_array_equal(np.array(trainer.loss_fn(model, padded)), np.array(trainer.loss_fn(model, batch)))


def test_compiled_steps_train_like_eager_steps(tmp_path):
    args = [*TINY, "--steps", "4", "--eval-every", "4"]
    eager = train.main([*args, "--out", str(tmp_path / "eager")])
    compiled = train.main([*args, "--out", str(tmp_path / "compiled"), "--compile"])
    assert_same_weights(weights(tmp_path / "eager"), weights(tmp_path / "compiled"), 1e-5)
    assert compiled["final_eval_loss"] == pytest.approx(eager["final_eval_loss"], rel=1e-5)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_finetune_lowers_eval_loss_on_the_new_corpus(tmp_path, lora_rank):
    train.main([*TINY, "--steps", "4", "--eval-every", "4", "--out", str(tmp_path / "base")])
    result = finetune.main(["--base", str(tmp_path / "base" / "checkpoint"), "--out", str(tmp_path / "ft"),
                            "--lora-rank", str(lora_rank), "--steps", "5", "--eval-every", "5", "--seq-len", "64",
                            "--batch-size", "2", "--eval-rows", "4", "--lr", "1e-2", "--warmup", "1",
                            "--sample-tokens", "20"])
    assert result["after"] < result["before"]


def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    args = [*TINY, "--steps", "3", "--eval-every", "3"]
    launch(2, TRAINING / "train.py", [*args, "--batch-size", "1", "--out", tmp_path / "two"], timeout=300)
    single = train.main([*args, "--batch-size", "2", "--out", str(tmp_path / "one")])
    assert_same_weights(weights(tmp_path / "two"), weights(tmp_path / "one"), 1e-5)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world"] == 2
    assert two["final_eval_loss"] == pytest.approx(single["final_eval_loss"], rel=1e-5)
