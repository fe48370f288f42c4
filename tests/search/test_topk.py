"""search.topk against a NumPy stable-sort reference, exactly: ties, chunking, sharding, bfloat16.

Integer-valued embeddings make dot products exact in float32 and full of ties, so any deviation
from "higher score first, then lower corpus index" shows up as a different index, not a rounding
difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh

from hybrid_jax.search import SearchInputError, exact_topk, search_with_ranks, topk


def _tied_embeddings(seed: int, num_queries: int, num_docs: int, dim: int = 6):
  rng = np.random.default_rng(seed)
  queries = rng.integers(-2, 3, (num_queries, dim)).astype(np.float32)
  corpus = rng.integers(-2, 3, (num_docs, dim)).astype(np.float32)
  return queries, corpus


def _reference_order(scores: np.ndarray) -> np.ndarray:
  """Corpus indices of each row sorted by (-score, index): np.lexsort, last key primary."""
  index = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
  return np.lexsort((index, -scores), axis=-1)


def _reference_topk(queries, corpus, k, mask=None):
  scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
  if mask is not None:
    scores = np.where(mask[None, :], scores, -np.inf)
  order = _reference_order(scores)[:, :k]
  return np.take_along_axis(scores, order, 1).astype(np.float32), order


def _all_devices_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ("corpus",))


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 203, 4096])
def test_topk_equals_stable_argsort_with_ties(chunk_size):
  queries, corpus = _tied_embeddings(0, 37, 203)
  want_scores, want_idx = _reference_topk(queries, corpus, 25)
  assert len(np.unique(want_scores)) < want_scores.size / 5  # the data really is full of ties
  scores, idx = exact_topk(queries, corpus, 25, chunk_size=chunk_size, query_chunk_size=16)
  assert idx.dtype == np.int64 and scores.dtype == np.float32 and idx.shape == (37, 25)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize("chunk_size", [8, 40, 203])
def test_sharded_over_8_devices_equals_single_device(chunk_size):
  queries, corpus = _tied_embeddings(1, 29, 203)
  single = exact_topk(queries, corpus, 30, chunk_size=chunk_size)
  sharded = exact_topk(queries, corpus, 30, chunk_size=chunk_size, mesh=_all_devices_mesh())
  np.testing.assert_array_equal(sharded[1], single[1])
  np.testing.assert_array_equal(sharded[0], single[0])
  np.testing.assert_array_equal(single[1], _reference_topk(queries, corpus, 30)[1])


@pytest.mark.parametrize("sharded", [False, True])
def test_two_stage_selection_of_large_chunks_is_exact_with_ties(sharded):
  # Chunks of >= 32 * k * 16 rows per device take the grouped path of topk._chunk_topk.
  queries, corpus = _tied_embeddings(8, 20, 20000, dim=4)
  mesh = _all_devices_mesh() if sharded else None
  scores, idx = exact_topk(queries, corpus, 4, chunk_size=16384, mesh=mesh)
  want_scores, want_idx = _reference_topk(queries, corpus, 4)
  assert len(np.unique(want_scores)) < 40  # thousands of documents tie for each place
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(scores, want_scores)


def test_two_axis_mesh_and_k_equal_to_corpus_size():
  queries, corpus = _tied_embeddings(2, 5, 24)
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
  scores, idx = exact_topk(queries, corpus, 24, chunk_size=16, mesh=mesh)
  np.testing.assert_array_equal(idx, _reference_topk(queries, corpus, 24)[1])
  assert (np.sort(idx, axis=1) == np.arange(24)).all()  # a full ranking: every document once


def test_signed_zero_scores_tie():
  # Document 0 scores -0.0 (0 * -1 summed), document 1 scores +0.0: equal, so index 0 first.
  queries = np.array([[0.0, 0.0]], np.float32)
  corpus = np.array([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]], np.float32)
  _, idx = exact_topk(queries, corpus, 3, chunk_size=2)
  np.testing.assert_array_equal(idx, [[0, 1, 2]])


def test_corpus_mask_never_returns_masked_documents():
  queries, corpus = _tied_embeddings(3, 11, 90)
  mask = np.random.default_rng(3).random(90) < 0.4
  scores, idx = exact_topk(queries, corpus, int(mask.sum()), chunk_size=32, corpus_mask=mask,
                           mesh=_all_devices_mesh())
  want_scores, want_idx = _reference_topk(queries, corpus, int(mask.sum()), mask)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(scores, want_scores)
  with pytest.raises(SearchInputError, match="corpus_mask allows"):
    exact_topk(queries, corpus, int(mask.sum()) + 1, corpus_mask=mask)


def test_bfloat16_embeddings_score_in_float32():
  rng = np.random.default_rng(4)
  queries = rng.standard_normal((13, 32)).astype(np.float32)
  corpus = rng.standard_normal((150, 32)).astype(np.float32)
  scores, idx = exact_topk(queries, corpus, 10, chunk_size=64, dtype=jnp.bfloat16)
  # Reference: the same bfloat16-rounded inputs, products summed in float64.
  q16 = queries.astype(ml_dtypes.bfloat16).astype(np.float64)
  c16 = corpus.astype(ml_dtypes.bfloat16).astype(np.float64)
  want_scores, want_idx = _reference_topk(q16, c16, 10)
  np.testing.assert_array_equal(idx, want_idx)  # random normal data: no near-ties at this size
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
  # Accumulation in float32, not bfloat16: scores carry more than bfloat16's 8 bits.
  assert not np.array_equal(scores, scores.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_jax_array_inputs():
  queries, corpus = _tied_embeddings(5, 9, 50)
  scores, idx = exact_topk(jnp.asarray(queries), jnp.asarray(corpus), 12, chunk_size=16)
  np.testing.assert_array_equal(idx, _reference_topk(queries, corpus, 12)[1])


def test_target_ranks_are_full_corpus_ranks():
  queries, corpus = _tied_embeddings(6, 23, 140)
  targets = np.random.default_rng(6).integers(-1, 140, (23, 5))
  result = search_with_ranks(queries, corpus, 10, targets=targets, chunk_size=24,
                             mesh=_all_devices_mesh())
  order = _reference_order(queries @ corpus.T)
  rank_of = np.argsort(order, axis=1) + 1  # rank_of[q, d] = 1-based position of d
  want = np.where(targets >= 0, np.take_along_axis(rank_of, np.maximum(targets, 0), 1), 0)
  np.testing.assert_array_equal(result.target_ranks, want)
  assert (want > 10).any() and ((want >= 1) & (want <= 10)).any()  # both sides of the cut-off


def test_errors():
  queries, corpus = _tied_embeddings(7, 3, 10)
  with pytest.raises(SearchInputError, match=r"k must be an integer in \[1, 10\]"):
    exact_topk(queries, corpus, 11)
  with pytest.raises(SearchInputError, match="same embedding dimension, found 6 .* and 5"):
    exact_topk(queries, corpus[:, :5], 3)
  with pytest.raises(SearchInputError, match="2-D"):
    exact_topk(queries[0], corpus, 3)
  with pytest.raises(SearchInputError, match="float32 or bfloat16"):
    exact_topk(queries, corpus, 3, dtype=jnp.float16)


# --- the pruned scan and the bfloat16 prefilter ------------------------------------------------
def _twin_embeddings(seed: int, num_queries: int, num_docs: int, dim: int = 32):
  """Documents in pairs whose scores differ by ~1e-3 relative: float32 orders every pair
  (differences far above its rounding), bfloat16 (relative precision 2^-9) often cannot."""
  rng = np.random.default_rng(seed)
  queries = rng.standard_normal((num_queries, dim)).astype(np.float32)
  base = rng.standard_normal((num_docs // 2, dim))
  twins = base * (1 + 1e-3 * rng.choice([-1.0, 1.0], size=(num_docs // 2, 1)))
  corpus = np.concatenate([base, twins]).astype(np.float32)[rng.permutation(num_docs)]
  return queries, corpus


@pytest.mark.parametrize("sharded", [False, True])
def test_bfloat16_prefilter_returns_the_exact_float32_top_k(sharded):
  queries, corpus = _twin_embeddings(0, 40, 3000)
  want_scores, want_idx = _reference_topk(queries, corpus, 30)
  # The test is only meaningful if bfloat16 scores alone would order documents differently.
  rounded = [x.astype(jnp.bfloat16).astype(np.float64) for x in (queries, corpus)]
  bfloat16_idx = _reference_order(rounded[0] @ rounded[1].T)[:, :30]
  assert (bfloat16_idx != want_idx).any(axis=1).mean() > 0.5
  mesh = _all_devices_mesh() if sharded else None
  result = search_with_ranks(queries, corpus, 30, chunk_size=512, query_chunk_size=16,
                             mesh=mesh, prefilter=True)
  np.testing.assert_array_equal(result.indices, want_idx)
  np.testing.assert_allclose(result.scores, want_scores, rtol=1e-6, atol=1e-5)
  assert result.fallback_queries == 0  # certified: the bound is tight enough for random data


@pytest.mark.parametrize("prefilter", [False, True])
def test_pruned_scan_falls_back_where_it_cannot_certify(prefilter):
  # Integer embeddings: scores tie in large blocks, so the evicted scores equal the k-th and the
  # certificate (strictly below the k-th) fails for most queries; the full selection answers.
  queries, corpus = _tied_embeddings(8, 30, 2000)
  want_scores, want_idx = _reference_topk(queries, corpus, 20)
  result = search_with_ranks(queries, corpus, 20, chunk_size=256, prefilter=prefilter)
  np.testing.assert_array_equal(result.indices, want_idx)
  np.testing.assert_array_equal(result.scores, want_scores)
  assert result.fallback_queries > 0


def test_bfloat16_prefilter_with_a_corpus_mask():
  queries, corpus = _twin_embeddings(1, 20, 1000)
  mask = np.random.default_rng(1).random(1000) < 0.6
  want_scores, want_idx = _reference_topk(queries, corpus, 15, mask)
  scores, idx = exact_topk(queries, corpus, 15, chunk_size=200, corpus_mask=mask,
                           prefilter=True)
  np.testing.assert_array_equal(idx, want_idx)
  assert mask[idx].all()


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("prefilter", [False, True])
def test_several_score_blocks_per_merge_and_several_merges(monkeypatch, sharded, prefilter):
  # Score blocks of 256 rows per device (16 groups, so only the best 8 groups of each block reach
  # the list), merged two blocks at a time: the CPU path of a large search, on a small corpus.
  monkeypatch.setattr(topk, "_CPU_SCORE_BLOCK", 16 * 256)
  monkeypatch.setattr(topk, "_CPU_MERGE_ROWS", 0)
  mesh = _all_devices_mesh() if sharded else None
  num_devices = len(jax.devices()) if sharded else 1
  chunk = 512 * num_devices
  shape = topk.pruned_shape(48, 8192, 10, chunk_size=chunk, query_chunk_size=16,
                            num_devices=num_devices)
  assert (shape.score_rows, shape.blocks_per_merge, shape.groups) == (256 * num_devices, 2, 8)
  queries, corpus = _twin_embeddings(2, 48, 8192)
  mask = np.random.default_rng(2).random(8192) < 0.9  # some blocks have masked rows
  want_scores, want_idx = _reference_topk(queries, corpus, 10, mask)
  result = search_with_ranks(queries, corpus, 10, chunk_size=chunk, query_chunk_size=16,
                             mesh=mesh, prefilter=prefilter, corpus_mask=mask)
  np.testing.assert_array_equal(result.indices, want_idx)
  np.testing.assert_allclose(result.scores, want_scores, rtol=1e-6, atol=1e-5)
  assert result.fallback_queries <= 4  # the pruned scan answered, not the fallback


def test_pruned_working_set_does_not_grow_with_the_corpus():
  sizes = [topk.pruned_shape(10_000, n, 100).working_set_bytes(384, 10_000)
           for n in (2_000_000, 8_000_000)]
  assert sizes[0] == sizes[1] < 2**30


@pytest.mark.parametrize("sharded", [False, True])
def test_a_block_holding_most_of_the_top_k_is_not_certified(monkeypatch, sharded):
  # Every query's top 10 lies in one device's part of the first score block, spread over more
  # than the 8 groups it keeps: the block's bound (its 9th group maximum) is above the k-th
  # score, so the pruned scan must not certify these queries (the full selection answers).
  monkeypatch.setattr(topk, "_CPU_SCORE_BLOCK", 16 * 256)
  monkeypatch.setattr(topk, "_CPU_MERGE_ROWS", 0)
  num_devices = len(jax.devices()) if sharded else 1
  rng = np.random.default_rng(3)
  direction = rng.standard_normal(32)
  queries = (direction + 0.1 * rng.standard_normal((16, 32))).astype(np.float32)
  corpus = rng.standard_normal((4096 * num_devices, 32))
  block = 256  # the first device's rows of the first block: every query's best documents
  corpus[:block] += 3 * direction
  corpus = corpus.astype(np.float32)
  want_scores, want_idx = _reference_topk(queries, corpus, 10)
  assert (want_idx < block).all()
  result = search_with_ranks(queries, corpus, 10, chunk_size=512 * num_devices,
                             query_chunk_size=16, prefilter=False,
                             mesh=_all_devices_mesh() if sharded else None)
  np.testing.assert_array_equal(result.indices, want_idx)
  np.testing.assert_allclose(result.scores, want_scores, rtol=1e-6, atol=1e-5)
  assert result.fallback_queries > 0
