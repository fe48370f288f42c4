"""Batch sampler: batch-type shares, languages per row and language frequencies (statistical, 4
sigma), determinism in (seed, step), host slices, repeat policy and config errors.

The expected frequencies are computed here from first principles (closed forms over the presence
matrix), not with the sampler's own helpers, so that a wrong weight formula fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_jax.data import records
from hybrid_jax.data import sampler as sampler_lib

NUM_BATCHES = 4000
BATCH = 16
# Languages with very different sizes, so "size" and "temperature" weights differ from uniform.
COVERAGE = (1.0, 0.8, 0.5, 0.3, 0.15)
LANGS = ("l0", "l1", "l2", "l3", "l4")


@pytest.fixture(scope="module")
def presence() -> np.ndarray:
  """[600, 5] bool; every id has language 0 (like MLQA-R's en), others with COVERAGE."""
  rng = np.random.default_rng(123)
  p = rng.random((600, len(COVERAGE))) < np.asarray(COVERAGE)[None, :]
  p[:, 0] = True
  assert p[:, -1].sum() >= BATCH  # every language can fill a batch without repeats
  return p


def _sampler(presence, **kwargs):
  return sampler_lib.BatchSampler(presence, LANGS, **kwargs)


def _plans(sampler, num=NUM_BATCHES, batch=BATCH, start=0):
  return [sampler.plan(step, batch) for step in range(start, start + num)]


def _z(observed: float, expected: float, sigma: float) -> float:
  return 0.0 if sigma == 0 else (observed - expected) / sigma


def _expected_weights(counts: np.ndarray, weighting: str, temperature: float) -> np.ndarray:
  counts = counts.astype(np.float64)
  raw = {"uniform": np.ones_like(counts), "size": counts,
         "temperature": np.exp(temperature * np.log(counts))}[weighting]
  return raw / raw.sum()


def _expected_xy_marginals(presence: np.ndarray, weights: np.ndarray):
  """Exact per-row P(query lang = k) and P(passage lang = k) of an X-Y row.

  The id is uniform over the ids with >= 2 languages; X ~ w restricted to the id's languages;
  Y ~ w restricted to the id's other languages.
  """
  pool = presence[presence.sum(axis=1) >= 2].astype(np.float64)  # [n, K]
  available = pool * weights[None, :]  # [n, K]
  p_query = available / available.sum(axis=1, keepdims=True)  # [n, K]: P(X = k | id)
  p_passage = np.zeros_like(p_query)
  for k in range(pool.shape[1]):  # P(Y = m | id) = sum_k P(X = k | id) P(Y = m | id, X = k)
    others = available.copy()
    others[:, k] = 0.0
    total = others.sum(axis=1, keepdims=True)
    p_passage += p_query[:, k:k + 1] * np.divide(others, total, out=np.zeros_like(others),
                                                 where=total > 0)
  return p_query.mean(axis=0), p_passage.mean(axis=0)


def _assert_counts_match(counts: np.ndarray, total: int, probabilities: np.ndarray, what: str):
  """Each category's count within 4 binomial sigmas of total * p."""
  expected = total * probabilities
  sigma = np.sqrt(total * probabilities * (1 - probabilities))
  z = np.array([_z(c, e, s) for c, e, s in zip(counts, expected, sigma)])
  assert np.all(np.abs(z) < 4), f"{what}: counts {counts}, expected {expected.round(1)}, z {z.round(2)}"
  # Categories with probability 0 must never occur.
  assert np.all(counts[probabilities == 0] == 0), what
  return z


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_hybrid_mono_share_matches_alpha(presence, alpha):
  plans = _plans(_sampler(presence, batch_type="hybrid", alpha=alpha))
  types = [p.batch_type for p in plans]
  assert set(types) <= {"mono", "xy"}
  num_mono = types.count("mono")
  sigma = np.sqrt(NUM_BATCHES * alpha * (1 - alpha))
  z = _z(num_mono, NUM_BATCHES * alpha, sigma)
  assert abs(z) < 4, f"alpha {alpha}: {num_mono}/{NUM_BATCHES} mono batches (z = {z:.2f})"
  if alpha in (0.0, 1.0):
    assert num_mono == NUM_BATCHES * alpha


@pytest.mark.parametrize("batch_type,alpha", [("hybrid", 0.5), ("mono", 0.5), ("xy", 0.5)])
def test_rows_respect_batch_type_and_presence(presence, batch_type, alpha):
  for plan in _plans(_sampler(presence, batch_type=batch_type, alpha=alpha), num=1000):
    assert len(plan) == BATCH
    assert len(set(plan.example.tolist())) == BATCH  # distinct ids (the pools are big enough)
    assert presence[plan.example, plan.query_lang].all()  # never a language the id lacks
    assert presence[plan.example, plan.passage_lang].all()
    if plan.batch_type == "mono":
      assert len(set(plan.query_lang.tolist())) == 1
      np.testing.assert_array_equal(plan.query_lang, plan.passage_lang)
    else:
      assert plan.batch_type == "xy"
      assert np.all(plan.query_lang != plan.passage_lang)
    if batch_type != "hybrid":
      assert plan.batch_type == batch_type


@pytest.mark.parametrize("weighting,temperature", [("uniform", 0.3), ("size", 0.3),
                                                    ("temperature", 0.3), ("temperature", 0.7)])
def test_mono_language_frequencies_match_weights(presence, weighting, temperature):
  sampler = _sampler(presence, batch_type="mono", weighting=weighting, temperature=temperature)
  weights = _expected_weights(presence.sum(axis=0), weighting, temperature)
  np.testing.assert_allclose(sampler.weights, weights, rtol=1e-12)
  languages = np.array([p.query_lang[0] for p in _plans(sampler)])
  counts = np.bincount(languages, minlength=len(LANGS))
  _assert_counts_match(counts, NUM_BATCHES, weights, f"mono languages ({weighting})")
  if weighting == "size":  # sanity of the fixture: size weighting really differs from uniform
    assert weights[0] > 3 * weights[-1]


@pytest.mark.parametrize("weighting", ["uniform", "size", "temperature"])
def test_xy_language_frequencies_match_weights(presence, weighting):
  sampler = _sampler(presence, batch_type="xy", weighting=weighting, temperature=0.5)
  weights = _expected_weights(presence.sum(axis=0), weighting, 0.5)
  p_query, p_passage = _expected_xy_marginals(presence, weights)
  plans = _plans(sampler, num=2000)
  query = np.concatenate([p.query_lang for p in plans])
  passage = np.concatenate([p.passage_lang for p in plans])
  rows = len(query)
  assert np.all(query != passage)
  _assert_counts_match(np.bincount(query, minlength=len(LANGS)), rows, p_query,
                       f"xy query languages ({weighting})")
  _assert_counts_match(np.bincount(passage, minlength=len(LANGS)), rows, p_passage,
                       f"xy passage languages ({weighting})")


def test_xy_with_full_presence_has_exactly_the_configured_query_weights():
  """Every id in every language (XQuAD-R-like): the query language marginal is the weights."""
  presence = np.ones((300, 4), dtype=bool)
  sampler = sampler_lib.BatchSampler(presence, LANGS[:4], batch_type="xy")
  query = np.concatenate([p.query_lang for p in _plans(sampler, num=2000)])
  _assert_counts_match(np.bincount(query, minlength=4), len(query), np.full(4, 0.25),
                       "xy query languages, full presence")


@pytest.mark.parametrize("alpha", [0.25, 0.6])
def test_mixed_rows(presence, alpha):
  sampler = _sampler(presence, batch_type="mixed", alpha=alpha, weighting="size")
  plans = _plans(sampler, num=2000)
  assert {p.batch_type for p in plans} == {"mixed"}
  query = np.concatenate([p.query_lang for p in plans])
  passage = np.concatenate([p.passage_lang for p in plans])
  example = np.concatenate([p.example for p in plans])
  assert presence[example, query].all() and presence[example, passage].all()
  assert presence[example].sum(axis=1).min() >= 2  # mixed rows come from the X-Y pool
  same = query == passage
  rows = len(query)
  z = _z(same.sum(), rows * alpha, np.sqrt(rows * alpha * (1 - alpha)))
  assert abs(z) < 4, f"mixed alpha {alpha}: {same.mean():.4f} mono rows (z = {z:.2f})"
  weights = _expected_weights(presence.sum(axis=0), "size", 0.3)
  p_query, _ = _expected_xy_marginals(presence, weights)
  _assert_counts_match(np.bincount(query, minlength=len(LANGS)), rows, p_query,
                       "mixed query languages")


def test_plan_is_a_pure_function_of_seed_and_step(presence):
  run = _sampler(presence, batch_type="hybrid", alpha=0.5, seed=7)
  sequential = _plans(run, num=40)
  resumed = _plans(_sampler(presence, batch_type="hybrid", alpha=0.5, seed=7), num=15, start=25)
  for a, b in zip(sequential[25:], resumed):
    assert (a.step, a.batch_type) == (b.step, b.batch_type)
    for field in ("example", "query_lang", "passage_lang"):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  # Asking out of order (or twice) changes nothing: there is no iterator state.
  again = run.plan(3, BATCH)
  np.testing.assert_array_equal(again.example, sequential[3].example)
  other_seed = _plans(_sampler(presence, batch_type="hybrid", alpha=0.5, seed=8), num=40)
  assert sum(np.array_equal(a.example, b.example) for a, b in zip(sequential, other_seed)) == 0


def test_mono_equals_hybrid_with_alpha_one(presence):
  mono = _sampler(presence, batch_type="mono", seed=3)
  hybrid = _sampler(presence, batch_type="hybrid", alpha=1.0, seed=3)
  for step in range(50):
    a, b = mono.plan(step, BATCH), hybrid.plan(step, BATCH)
    np.testing.assert_array_equal(a.example, b.example)
    np.testing.assert_array_equal(a.query_lang, b.query_lang)


@pytest.mark.parametrize("hosts", [2, 4, 8])
def test_host_slices_concatenate_to_the_global_batch(presence, hosts):
  sampler = _sampler(presence, batch_type="hybrid", alpha=0.5)
  for step in range(20):
    plan = sampler.plan(step, 32)
    slices = [plan.host_slice(i, hosts) for i in range(hosts)]
    assert all(len(s) == 32 // hosts and s.batch_type == plan.batch_type for s in slices)
    for field in ("example", "query_lang", "passage_lang"):
      np.testing.assert_array_equal(np.concatenate([getattr(s, field) for s in slices]),
                                    getattr(plan, field))


def test_rows_restrict_the_pool_and_plans_hold_corpus_rows(presence):
  rows = np.arange(1, 600, 2)  # odd corpus rows only (e.g. the training split)
  sampler = _sampler(presence, rows=rows, batch_type="hybrid", alpha=0.5)
  example = np.concatenate([p.example for p in _plans(sampler, num=300)])
  assert np.all(example % 2 == 1)
  np.testing.assert_array_equal(sampler.counts, presence[rows].sum(axis=0))


def test_error_policy_refuses_batches_a_language_cannot_fill(presence):
  small = int(presence[:, -1].sum())  # the smallest language
  sampler = _sampler(presence, batch_type="hybrid", alpha=0.5)
  with pytest.raises(records.DataError, match=rf"l4 has {small} ids.*repeat_policy='repeat'"):
    sampler.check_batch_size(small + 1)
  # The policy also holds when a caller forgets to check: no silent repeats.
  with pytest.raises(records.DataError, match="cannot be filled with distinct ids"):
    sampler.plan(0, small + 1)
  sampler.check_batch_size(small)  # exactly fillable
  # X-Y batches only need the multilingual pool, so the small language is no obstacle there.
  _sampler(presence, batch_type="xy").check_batch_size(small + 1)
  pool = int((presence.sum(axis=1) >= 2).sum())
  with pytest.raises(records.DataError, match=rf"only {pool} ids exist in two or more"):
    _sampler(presence, batch_type="xy").check_batch_size(pool + 1)


def test_repeat_policy_fills_with_whole_permutations():
  presence = np.zeros((10, 2), dtype=bool)
  presence[:, 0] = True
  presence[:4, 1] = True  # language 1 has 4 ids
  sampler = sampler_lib.BatchSampler(presence, ("a", "b"), batch_type="mono", repeat_policy="repeat",
                                     weighting="uniform")
  for step in range(200):
    plan = sampler.plan(step, 10)
    counts = np.bincount(plan.example, minlength=10)
    members = np.flatnonzero(presence[:, plan.query_lang[0]])
    if len(members) == 4:  # 10 rows from 4 ids: ceil(10/4) = 3 permutations, cut at 10 rows
      assert set(plan.example.tolist()) == set(members.tolist())
      assert counts.max() <= 3 and counts[members].min() >= 2
    else:
      assert counts.max() == 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_type="hybrid", alpha=1.5), r"data.alpha must be in \[0, 1\].*found 1.5"),
    (dict(batch_type="hybrid", alpha=-0.1), r"data.alpha must be in \[0, 1\]"),
    (dict(batch_type="hybrid", alpha=True), r"data.alpha must be in \[0, 1\]"),
    (dict(batch_type="xx"), r"data.batch_type must be one of"),
    (dict(batch_type="mono", weighting="sqrt"), r"data.language_weighting must be one of"),
    (dict(batch_type="mono", weighting="temperature", temperature=0.0),
     r"data.language_temperature must be > 0"),
    (dict(batch_type="mono", repeat_policy="wrap"), r"data.repeat_policy must be one of"),
    (dict(batch_type="mono", seed=-1), r"data.seed must be a non-negative integer"),
])
def test_config_errors(presence, kwargs, message):
  with pytest.raises(records.DataError, match=message):
    _sampler(presence, **kwargs)


def test_empty_language_and_missing_cross_lingual_pool_are_errors():
  presence = np.zeros((5, 3), dtype=bool)
  presence[:, 0] = True
  presence[:2, 1] = True
  with pytest.raises(records.DataError, match=r"\['c'\] have no training examples"):
    sampler_lib.BatchSampler(presence, ("a", "b", "c"), batch_type="mono")
  only_a = presence[:, :1]
  with pytest.raises(records.DataError, match="no training id exists in two or more"):
    sampler_lib.BatchSampler(only_a, ("a",), batch_type="hybrid", alpha=0.5)
  sampler_lib.BatchSampler(only_a, ("a",), batch_type="hybrid", alpha=1.0)  # mono only: fine


def test_host_batch_size_errors():
  assert sampler_lib.host_batch_size(32, 4) == 8
  with pytest.raises(records.DataError, match="not divisible by the number of processes 3"):
    sampler_lib.host_batch_size(32, 3)
  with pytest.raises(records.DataError, match="must be positive"):
    sampler_lib.host_batch_size(0, 1)


def test_validation_plans_cover_types_and_languages(presence):
  rows = np.arange(0, 600, 10)
  sampler = sampler_lib.BatchSampler(presence, LANGS, rows=rows, batch_type="hybrid", alpha=0.5,
                                     repeat_policy="repeat", stream=sampler_lib.VALIDATION_STREAM,
                                     allow_empty_languages=True)
  plans = sampler.validation_plans(BATCH, 20)
  assert [p.batch_type for p in plans] == ["mono", "xy"] * 10
  assert [int(p.query_lang[0]) for p in plans[::2]] == [0, 1, 2, 3, 4] * 2
  assert all(np.isin(p.example, rows).all() for p in plans)
  again = sampler.validation_plans(BATCH, 20)
  assert all(np.array_equal(a.example, b.example) for a, b in zip(plans, again))
  train = sampler_lib.BatchSampler(presence, LANGS, rows=rows, batch_type="hybrid", alpha=0.5,
                                   repeat_policy="repeat")
  assert not np.array_equal(train.plan(0, BATCH).example, plans[0].example)
