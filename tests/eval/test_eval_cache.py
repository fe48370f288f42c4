"""The embedding cache re-encodes exactly when an input of the embeddings changed.

Two levels hold the guarantee. `GridEvaluator.embed` keys each side (queries, candidates) by the
digest of its prefixed texts, its uids and the caller's `cache_key`: changed texts or prefixes are
its business. What identifies the encoder (model files, workdir parameters, pooling, dtype, max
lengths) is what `runner` puts into `cache_key`, so those are tested through `runner.run`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest

from hybrid_jax.eval import embeddings_io
from hybrid_jax.eval import grid_evaluator
from hybrid_jax.eval import runner
from hybrid_jax.models import inference

from eval_helpers import CountingEmbedFn, tiny_collection, write_tiny_beir, write_tiny_model

KEY = {"model": "a"}


def _embed(cache_dir, fn, *, collection=None, key=KEY, **prefixes):
  evaluator = grid_evaluator.GridEvaluator(collection or tiny_collection(), show_progress=False,
                                           **prefixes)
  return evaluator.embed(fn, cache_dir=str(cache_dir), cache_key=key)


def test_identical_call_reuses_the_cache(tmp_path):
  first = CountingEmbedFn()
  queries, candidates = _embed(tmp_path, first)
  assert first.calls == [("Query: ", 4), ("Passage: ", 4)]
  again = CountingEmbedFn(seed=1)  # would give other vectors, had it been called
  cached_queries, cached_candidates = _embed(tmp_path, again)
  assert again.calls == []
  np.testing.assert_array_equal(cached_queries, queries)
  np.testing.assert_array_equal(cached_candidates, candidates)


@pytest.mark.parametrize("change, re_encoded", [
    (dict(collection=tiny_collection(candidate_texts=[
        "the cat is on the mat", "die katze ist auf der matte", "the war ended in 1918",
        "der krieg endete 1945"])), {"candidates"}),
    (dict(collection=tiny_collection(query_texts=[
        "where is the dog", "wo ist die katze", "when was the war", "wann war der krieg"])),
     {"queries"}),
    (dict(query_prefix="query: "), {"queries"}),
    (dict(passage_prefix="passage: "), {"candidates"}),
    (dict(key={"model": "b"}), {"queries", "candidates"}),
], ids=["candidate_text", "query_text", "query_prefix", "passage_prefix", "cache_key"])
def test_a_changed_input_re_encodes_its_side_only(tmp_path, change, re_encoded):
  old_encoder, new_encoder = CountingEmbedFn(seed=0), CountingEmbedFn(seed=1)
  _embed(tmp_path, old_encoder)
  queries, candidates = _embed(tmp_path, new_encoder, **change)
  collection = change.get("collection") or tiny_collection()
  query_prefix = change.get("query_prefix", "Query: ")
  passage_prefix = change.get("passage_prefix", "Passage: ")
  expected_calls = [(query_prefix, 4)] * ("queries" in re_encoded) + [
      (passage_prefix, 4)] * ("candidates" in re_encoded)
  assert new_encoder.calls == expected_calls
  # A re-encoded side holds the new encoder's vectors, the other side the cached ones.
  for side, texts, prefix, kind in ((queries, collection.query_texts, query_prefix, "queries"),
                                    (candidates, collection.candidate_texts, passage_prefix,
                                     "candidates")):
    encoder = CountingEmbedFn(seed=1 if kind in re_encoded else 0)
    np.testing.assert_array_equal(side, encoder(texts, prefix))
  # The cache now holds the new inputs: the same call again encodes nothing.
  unused = CountingEmbedFn(seed=2)
  _embed(tmp_path, unused, **change)
  assert unused.calls == []


def test_no_cache_key_means_no_cache_and_a_damaged_cache_is_recomputed(tmp_path):
  fn = CountingEmbedFn()
  _embed(tmp_path, fn, key=None)
  _embed(tmp_path, fn, key=None)
  assert len(fn.calls) == 4 and not os.listdir(tmp_path)
  _embed(tmp_path, fn)
  with open(tmp_path / "queries.npy", "wb") as f:
    f.write(b"not an array")
  fn.calls.clear()
  _embed(tmp_path, fn)
  assert fn.calls == [("Query: ", 4)]


# --- what identifies the encoder: the runner's cache key ----------------------------------------
@pytest.fixture()
def count_encodes(monkeypatch):
  """Every TextEmbedder.embed call as (max_length, number of texts)."""
  calls = []
  original = inference.TextEmbedder.embed

  def counting(self, texts, prefix="", desc=None):
    calls.append((self.max_length, len(texts)))
    return original(self, texts, prefix=prefix, desc=desc)

  monkeypatch.setattr(inference.TextEmbedder, "embed", counting)
  return calls


def test_runner_re_encodes_for_another_model_length_or_pooling(tmp_path, count_encodes):
  beir_dir, texts = write_tiny_beir(str(tmp_path / "beir"))
  model = write_tiny_model(str(tmp_path / "model"), texts, hidden_size=16, num_layers=1,
                           num_heads=2, max_position=32, seed=0)
  exported = str(tmp_path / "exported")
  base = runner.RunOptions(model=model, dataset="beir", data_dir=beir_dir,
                           output_dir=str(tmp_path / "out"), query_max_length=16,
                           passage_max_length=24, batch_size=8, show_progress=False,
                           export_embeddings=exported)

  def run(**changes):
    """The query embeddings of one run (as exported, cached or not)."""
    count_encodes.clear()
    runner.run(dataclasses.replace(base, **changes))
    return embeddings_io.load(exported, "queries")[1]

  first = run()
  assert count_encodes == [(16, 3), (24, 4)]
  np.testing.assert_array_equal(run(), first)
  assert count_encodes == []  # identical: both sides from the cache
  run(query_max_length=8)
  assert count_encodes == [(8, 3), (24, 4)]  # the key holds both lengths: both re-encoded
  run(passage_max_length=16)
  assert count_encodes == [(16, 3), (16, 4)]
  run(pooling="cls")
  assert count_encodes == [(16, 3), (24, 4)]
  run()
  assert count_encodes == [(16, 3), (24, 4)]  # back to mean pooling: the cache was overwritten
  # Other weights of the same architecture written in place: every file keeps its size, and
  # (as when a model is exported twice within a second) its modification time's whole second.
  before = {name: os.stat(os.path.join(model, name)).st_mtime_ns for name in os.listdir(model)}
  write_tiny_model(model, texts, hidden_size=16, num_layers=1, num_heads=2, max_position=32,
                   seed=1)
  for name, mtime_ns in before.items():
    same_second = mtime_ns - mtime_ns % 10**9 + (mtime_ns % 10**9 + 1) % 10**9
    os.utime(os.path.join(model, name), ns=(same_second, same_second))
  other = run()
  assert count_encodes == [(16, 3), (24, 4)]
  assert np.abs(other - first).max() > 1e-3


def test_runner_re_encodes_a_workdir_retrained_to_the_same_step(tmp_path, count_encodes):
  """The step number of a workdir does not identify its parameters: a run trained again in the
  same directory reaches the same steps with other weights."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from hybrid_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top

  beir_dir, texts = write_tiny_beir(str(tmp_path / "beir"))
  pretrained = hf_checkpoint.load_pretrained(write_tiny_model(
      str(tmp_path / "model"), texts, hidden_size=16, num_layers=1, num_heads=2, max_position=32))
  workdir = str(tmp_path / "run")
  checkpointing.write_run_files(workdir, ml_collections.ConfigDict({"seed": 0}),
                                pretrained.config, pretrained.tokenizer)

  def save_best(params):
    shutil.rmtree(os.path.join(workdir, checkpointing.BEST_DIR), ignore_errors=True)
    checkpointer = checkpointing.Checkpointer(workdir, every_steps=1, keep=1, async_save=False)
    checkpointer.save_best(5, {"encoder": params}, validation_loss=1.0)
    checkpointer.close()

  exported = str(tmp_path / "exported")
  options = runner.RunOptions(workdir=workdir, step="best", dataset="beir", data_dir=beir_dir,
                              output_dir=str(tmp_path / "out"), query_max_length=16,
                              passage_max_length=24, batch_size=8, show_progress=False,
                              export_embeddings=exported)

  def run():
    count_encodes.clear()
    runner.run(options)
    return embeddings_io.load(exported, "queries")[1]

  save_best(pretrained.params)
  first = run()
  assert count_encodes == [(16, 3), (24, 4)]
  np.testing.assert_array_equal(run(), first)
  assert count_encodes == []
  rng = np.random.default_rng(0)  # "retrained": other weights, saved at the same step 5
  save_best(jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype),
                         pretrained.params))
  retrained = run()
  assert count_encodes == [(16, 3), (24, 4)]
  assert np.abs(retrained - first).max() > 1e-3
