"""examples/training/finetune_mlx_lm.py: an unmodified mlx-lm llama trains identically through mfa."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install mlx-lm)")
from mlx_lm.models import llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "training"))

import finetune_mlx_lm  # noqa: E402

import mfa  # noqa: E402

CONFIG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=300, tie_word_embeddings=True)


def tiny_llama(seed: int = 0) -> nn.Module:
    """A randomly initialised llama from a config (no download)."""
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(CONFIG))
    mx.eval(model.parameters())
    return model


def test_loss_and_lora_grads_equal_the_stock_run():
    model = tiny_llama()
    finetune_mlx_lm.add_lora(model, rank=4, scale=2.0, num_layers=-1)
    # LoRA B starts at zero: move it so that every adapter gradient is non-trivial
    model.update(tree_unflatten([(name, mx.random.normal(p.shape) * 0.1)
                                 for name, p in tree_flatten(model.trainable_parameters()) if name.endswith("lora_b")]))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 300, n).astype(np.int32) for n in (17, 9, 33)]
    batch = finetune_mlx_lm.pad_batch(seqs)
    value_and_grad = nn.value_and_grad(model, finetune_mlx_lm.loss_fn)

    stock_loss, stock_grads = value_and_grad(model, *batch)
    mx.eval(stock_loss, stock_grads)
    calls = []
    routed = mfa.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("mask"))
        return routed(*args, **kwargs)

    mfa.scaled_dot_product_attention = counting
    try:
        with mfa.installed():
            loss, grads = value_and_grad(model, *batch)
            mx.eval(loss, grads)
    finally:
        mfa.scaled_dot_product_attention = routed
    assert len(calls) == CONFIG["num_hidden_layers"]  # every layer's attention went through mfa
    assert loss.item() == pytest.approx(stock_loss.item(), rel=1e-5)
    grads, stock_grads = dict(tree_flatten(grads)), dict(tree_flatten(stock_grads))
    assert grads.keys() == stock_grads.keys()
    assert grads and all(name.endswith(("lora_a", "lora_b")) for name in grads)
    for name in grads:
        np.testing.assert_allclose(np.array(grads[name]), np.array(stock_grads[name]), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def write_local_model(path: Path) -> None:
    """An mlx-lm model directory: config, random weights and a small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CONFIG["vocab_size"], special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Simple Apple Cake. Serves 4. Heat the oven to 180 degrees and bake."], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)
    model = tiny_llama()
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps({**CONFIG, "vocab_size": tok.get_vocab_size()}))


def test_script_fine_tunes_a_local_model_and_saves_mlx_lm_adapters(tmp_path):
    from mlx_lm import load

    write_local_model(tmp_path / "model")
    result = finetune_mlx_lm.main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "adapters"),
                                   "--steps", "8", "--lr", "1e-2", "--batch-size", "2", "--max-length", "64",
                                   "--eval-docs", "4"])
    assert result["after"] < result["before"]
    model, _ = load(str(tmp_path / "model"), adapter_path=str(tmp_path / "adapters"))
    loaded = dict(tree_flatten(model.parameters()))
    saved = mx.load(str(tmp_path / "adapters" / "adapters.safetensors"))
    assert saved and all(np.array_equal(np.array(loaded[k]), np.array(v)) for k, v in saved.items())
