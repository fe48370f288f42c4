"""TextEmbedder: PyTorch parity, input order, length buckets, sharding, progress, errors."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from eval.eval_helpers import torch_mean_pooled, write_tiny_model  # tests/eval/eval_helpers.py
from hybrid_jax.models import hf_checkpoint
from hybrid_jax.models import inference

_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
          "sigma tau upsilon phi chi psi omega").split()


def _texts(n: int, seed: int = 0, max_words: int = 70) -> list[str]:
  """Texts of very different lengths (1 to max_words words: long ones get truncated), one empty."""
  rng = np.random.default_rng(seed)
  texts = [" ".join(rng.choice(_WORDS, size=int(rng.integers(1, max_words))))
           for _ in range(n)]
  texts[3] = ""
  texts[7] = "Zürich, naïve café! 東京?"  # unknown words and punctuation
  return texts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return write_tiny_model(str(tmp_path_factory.mktemp("tiny")), [" ".join(_WORDS), "Query :"])


@pytest.fixture(scope="module")
def pretrained(model_dir):
  return hf_checkpoint.load_pretrained(model_dir)

# Compiling one batch shape takes ~1-2 s on a busy 2-core CPU: the tests below keep lengths short
# (max_length 16: buckets 8 and 16) so that each embedder compiles only a few shapes.


def test_matches_pytorch_in_input_order(model_dir):
  texts = _texts(45)
  embedder = inference.TextEmbedder.from_pretrained(model_dir, batch_size=16, max_length=32)
  ours = embedder.embed(texts, prefix="Query: ")
  reference = torch_mean_pooled(model_dir, texts, prefix="Query: ", max_length=32)
  assert ours.shape == (45, 32) and ours.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
  assert np.max(np.abs(ours - reference)) <= 1e-5
  # Few shapes: rows a multiple of the 8 devices, lengths from the bucket ladder.
  assert jax.device_count() == 8
  assert all(rows % 8 == 0 for rows, _ in embedder.compiled_shapes)
  assert {length for _, length in embedder.compiled_shapes} <= set(inference.bucket_lengths(32))
  assert len(embedder.compiled_shapes) <= 4


def test_order_batching_and_devices_do_not_change_rows(pretrained):
  texts = _texts(35, seed=1, max_words=20)
  sharded = inference.TextEmbedder(pretrained.config, pretrained.params, pretrained.tokenizer,
                                   batch_size=8, max_length=16)
  single = inference.TextEmbedder(pretrained.config, pretrained.params, pretrained.tokenizer,
                                  batch_size=5, max_length=16,
                                  mesh=Mesh(np.array(jax.devices()[:1]), ("data",)))
  a = sharded.embed(texts)
  b = single.embed(texts[::-1])[::-1]
  np.testing.assert_allclose(a, b, atol=1e-6)
  # Each text alone (a batch of one padded row plus empty rows) gives its row of the big batch.
  one_by_one = np.stack([sharded.embed([t])[0] for t in texts[:3]])
  np.testing.assert_allclose(a[:3], one_by_one, atol=1e-6)
  assert single.batch_size == 5 and sharded.batch_size == 8
  assert single.compiled_shapes <= {(5, 8), (5, 16)}
  assert sharded.compiled_shapes <= {(8, 8), (8, 16)}
  assert sharded.embed([]).shape == (0, 32)


def test_bfloat16_and_from_params(pretrained):
  loaded = types.SimpleNamespace(config=pretrained.config, params=pretrained.params,
                                 tokenizer=pretrained.tokenizer, step=7)
  texts = _texts(20, seed=2, max_words=12)
  f32 = inference.TextEmbedder.from_params(loaded, batch_size=8, max_length=16).embed(texts)
  bf16 = inference.TextEmbedder.from_params(loaded, batch_size=8, max_length=16,
                                            dtype=jnp.bfloat16).embed(texts)
  assert bf16.dtype == np.float32
  cosine = np.sum(f32 * bf16, axis=1)
  assert cosine.min() > 0.99 and np.max(np.abs(f32 - bf16)) > 1e-5  # really ran in bf16


def test_progress_on_stderr(model_dir, capsys):
  embedder = inference.TextEmbedder.from_pretrained(model_dir, batch_size=8, max_length=16)
  embedder.embed(_texts(20, max_words=12), desc="embedding test")
  err = capsys.readouterr().err
  assert "embedding test: 20/20 texts" in err and "ETA" in err
  embedder.embed(_texts(20, max_words=12))
  assert capsys.readouterr().err == ""


def test_clear_errors(pretrained, tmp_path):
  with pytest.raises(inference.InferenceError, match=r"max_length 100 exceeds .*\(64 tokens"):
    inference.TextEmbedder(pretrained.config, pretrained.params, pretrained.tokenizer,
                           max_length=100)
  with pytest.raises(inference.InferenceError, match=r"batch_size must be >= 1"):
    inference.TextEmbedder(pretrained.config, pretrained.params, pretrained.tokenizer,
                           batch_size=0)
  with pytest.raises(inference.InferenceError, match=r"needs the model's tokenizer"):
    inference.TextEmbedder(pretrained.config, pretrained.params, None)
  embedder = inference.TextEmbedder(pretrained.config, pretrained.params, pretrained.tokenizer,
                                    max_length=32)
  with pytest.raises(inference.InferenceError, match=r"item 1 is NoneType"):
    embedder.embed(["fine", None])
  with pytest.raises(hf_checkpoint.CheckpointError, match=r"does not exist"):
    inference.TextEmbedder.from_pretrained(str(tmp_path / "nowhere"))


def test_set_params_swaps_the_weights_and_keeps_the_compiled_shapes(pretrained):
  texts = _texts(12, seed=3, max_words=12)
  embedder = inference.TextEmbedder(pretrained.config, pretrained.params, pretrained.tokenizer,
                                    batch_size=8, max_length=16)
  before = embedder.embed(texts)
  shapes = set(embedder.compiled_shapes)
  rng = np.random.default_rng(0)
  other = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype),
                       pretrained.params)
  embedder.set_params(other)
  after = embedder.embed(texts)
  fresh = inference.TextEmbedder(pretrained.config, other, pretrained.tokenizer, batch_size=8,
                                 max_length=16).embed(texts)
  np.testing.assert_allclose(after, fresh, atol=1e-6)
  assert np.abs(after - before).max() > 1e-3 and embedder.compiled_shapes == shapes
  with pytest.raises(inference.InferenceError, match=r"tree structure and shapes"):
    embedder.set_params({"embeddings": np.zeros(3, np.float32)})
  with pytest.raises(inference.InferenceError, match=r"tree structure and shapes"):
    embedder.set_params(jax.tree.map(lambda x: np.zeros(x.shape + (1,), x.dtype), other))


def test_embed_fns_pair_the_query_and_passage_embedders(pretrained, capsys):
  texts = _texts(10, seed=4, max_words=30)
  short = inference.TextEmbedder(pretrained.config, pretrained.params, pretrained.tokenizer,
                                 batch_size=8, max_length=8)
  long = inference.TextEmbedder(pretrained.config, pretrained.params, pretrained.tokenizer,
                                batch_size=8, max_length=16)
  embed_queries, embed_passages = inference.embed_fns(short, long)
  np.testing.assert_array_equal(embed_queries(texts, "Query: "), short.embed(texts, "Query: "))
  np.testing.assert_array_equal(embed_passages(texts, "P: "), long.embed(texts, "P: "))
  assert capsys.readouterr().err == ""  # quiet unless asked
  _, same = inference.embed_fns(short)  # one embedder for both sides
  np.testing.assert_array_equal(same(texts, ""), short.embed(texts))
  loud_queries, loud_passages = inference.embed_fns(short, long, show_progress=True)
  loud_queries(texts, "")
  loud_passages(texts, "")
  err = capsys.readouterr().err
  assert "embedding queries: 10/10 texts" in err and "embedding candidates: 10/10 texts" in err
