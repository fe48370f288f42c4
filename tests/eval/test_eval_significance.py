"""Paired permutation test: exact against full enumeration, and the compare command.

`compare` is verified against an exact 2^Q sign-flip enumeration computed here from the per-query
metrics themselves (no weights, no code from significance.py): two tiny runs (10 queries, 2
languages, so 6 X->Y / X->all settings and 3 summaries) written with the evaluator's own writers,
run B's queries stored in a shuffled order. For every summary and setting the p-value, the A / B
values and the query counts are compared, for mAP and for the pool-only rank distance, and the
Holm adjustment is checked against Holm written here from its definition.

significance.py never enumerates: it always draws `num_permutations` random sign patterns (10,000
by default, even when 2^Q is smaller) and reports the Monte-Carlo p-value (1 + count) / (1 + N)
(count = draws with |T*| >= |T|, ties included), which is never 0 and is a valid p-value for any N
(Phipson & Smyth 2010). The exact p-value is count / 2^Q over ALL patterns, the identity included.
So the comparison is statistical: with N draws, count ~ Binomial(N, p_exact) and the reported p must
lie within 4 standard deviations of its mean (1 + N p_exact) / (1 + N). Exact enumeration was not
added to significance.py: real collections have thousands of queries (every statistic flips all of
them), so it would be a code path that only tests reach, and the CLI's "(N sign flips)" line would
misdescribe it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import metrics as metrics_lib
from hybrid_jax.eval import report
from hybrid_jax.eval import significance


def test_sign_flip_pvalue_matches_exact_enumeration():
  d = np.array([0.9, 0.4, -0.1, 0.7, 0.3, -0.2, 0.5, 0.6, 0.05, 0.8])
  observed = abs(d.sum())
  flips = np.array(list(itertools.product([-1, 1], repeat=len(d))))
  exact = np.mean(np.abs(flips @ d) >= observed - 1e-12)  # 2^10 sign patterns
  p = significance.sign_flip_pvalues(d[None, :], num_permutations=40_000, seed=1)[0]
  assert exact == pytest.approx(16 / 1024)  # 8 patterns at least as extreme, times 2 sides
  assert abs(p - exact) < 0.003  # Monte-Carlo error at 40k draws: sd ~ 0.0005
  # Seeded: the same call gives the same p; an all-zero difference gives p = 1.
  assert p == significance.sign_flip_pvalues(d[None, :], 40_000, seed=1)[0]
  assert significance.sign_flip_pvalues(np.zeros((1, 5)), 100)[0] == 1.0


def test_holm_adjustment():
  np.testing.assert_allclose(significance.holm([0.01, 0.04, 0.03, 0.5]), [0.04, 0.09, 0.09, 0.5])


def test_monte_carlo_pvalue_convention_is_count_plus_one_over_draws_plus_one():
  # 60 equal differences: only the all-equal-sign patterns (2 of 2^60) reach |T|, so no random
  # draw does (count = 0): (count + 1) / (N + 1) gives 1 / (N + 1), count / N would give 0.
  for draws in (99, 2500):
    p = significance.sign_flip_pvalues(np.ones((1, 60)), num_permutations=draws, seed=3)[0]
    assert p == 1 / (draws + 1)


# --- compare against exact enumeration ------------------------------------------------------------
LANGS = ["en", "de"]
COLUMNS = LANGS + ["all"]  # per-query setting axis: candidate languages, then the pool
QUESTIONS = 5  # each asked in both languages: Q = 10 queries, 2^10 sign patterns
NO_GERMAN_ANSWER = 4  # this question has no de candidate: its en->de and de->de cells are NaN
DRAWS = 1_000_000  # Monte-Carlo draws asked of compare: sd of p <= 0.0005


def holm_from_definition(pvalues):
  """Holm (1979): sort p_(1) <= ... <= p_(m); adjusted p_(i) = max_{j<=i} min(1, (m-j+1) p_(j))."""
  p = np.asarray(pvalues, np.float64)
  m = len(p)
  order = np.argsort(p, kind="stable")
  scaled = [min(1.0, (m - j) * p[order[j]]) for j in range(m)]  # j is 0-based here
  adjusted = np.empty(m)
  for i in range(m):
    adjusted[order[i]] = max(scaled[:i + 1])
  return adjusted


def test_holm_matches_its_definition_with_ties_and_clipping():
  rng = np.random.default_rng(5)
  for _ in range(50):
    p = np.round(rng.uniform(0, 0.4, size=rng.integers(1, 9)), 2)  # rounding makes ties
    np.testing.assert_allclose(significance.holm(p), holm_from_definition(p), rtol=0, atol=1e-15)


def tiny_collection(order):
  """Queries q{i}_{lang} in the given order of (question, lang) pairs; one candidate per pair,
  except no German candidate for NO_GERMAN_ANSWER. (compare only reads the uids and languages.)"""
  pairs = [(i, lang) for i in range(QUESTIONS) for lang in LANGS
           if not (i == NO_GERMAN_ANSWER and lang == "de")]
  cand_index = {pair: c for c, pair in enumerate(pairs)}
  return collection_lib.Collection(
      name="tiny", languages=LANGS,
      query_uids=[f"q{i}_{lang}" for i, lang in order],
      query_texts=[f"question {i}" for i, _ in order], query_langs=[lang for _, lang in order],
      candidate_uids=[f"c{i}_{lang}" for i, lang in pairs],
      candidate_texts=[f"answer {i}" for i, _ in pairs],
      candidate_langs=[lang for _, lang in pairs],
      relevant=[[(cand_index[i, y], 1.0) for y in LANGS if (i, y) in cand_index] for i, _ in order])


def synthetic_metrics(rng, shift=0):
  """Per-query mAP [Q, 3] and rank distance [Q] in canonical query order (question-major).

  mAP values are multiples of 1/64 so that B - A is exact in float32 and many sign patterns TIE
  with the observed statistic: the test then also checks that ties count as "as extreme".
  """
  q = QUESTIONS * len(LANGS)
  ap = rng.integers(8, 57, size=(q, len(COLUMNS))) / 64.0
  ap = np.clip(ap + shift * rng.integers(0, 5, size=(q, len(COLUMNS))) / 64.0, 0.0, 1.0)
  ap[[2 * NO_GERMAN_ANSWER, 2 * NO_GERMAN_ANSWER + 1], COLUMNS.index("de")] = np.nan
  rank_distance = rng.integers(4, 12, size=q).astype(np.float32)
  return ap.astype(np.float32), rank_distance


def write_run(directory, order, ap, rank_distance):
  """An evaluation output directory as the evaluator writes it, queries in `order`."""
  directory.mkdir()
  canonical = [(i, lang) for i in range(QUESTIONS) for lang in LANGS]
  rows = np.array([canonical.index(pair) for pair in order])
  collection = tiny_collection(order)
  num_relevant = np.where(np.isnan(ap[rows]), 0, 1).astype(np.int32)
  per_query = metrics_lib.PerQueryMetrics(
      values={"map": ap[rows]}, num_relevant=num_relevant, rank_distance=rank_distance[rows],
      best_rank=num_relevant.copy())
  report.write_results_json(str(directory), {"dataset": "tiny", "languages": LANGS})
  report.write_per_query(str(directory), collection, per_query)
  return str(directory)


def exact_statistics(a, b, query_lang, columns):
  """Every setting and summary under all 2^Q sign patterns, straight from their definitions.

  a, b: [Q, len(columns)] per-query values of the two runs, NaN where a query is not scored.
  Returns {name: (A value, B value, queries, T under every pattern [2^Q], observed T)}: a setting
  X->Y is the mean over X's scored queries, a summary the mean over its settings; flipping the
  sign of query q swaps A and B for q in every setting at once.
  """
  a, b = a.astype(np.float64), b.astype(np.float64)
  signs = np.array(list(itertools.product([1.0, -1.0], repeat=len(a))))  # row 0: the identity
  diff = b - a
  settings = {}
  for x in LANGS:
    for j, y in enumerate(columns):
      rows = (query_lang == x) & ~np.isnan(diff[:, j])
      if rows.any():
        flipped = (signs[:, rows] * diff[rows, j]).mean(axis=1)
        settings[f"{x}->{y}"] = (np.mean(a[rows, j]), np.mean(b[rows, j]), int(rows.sum()),
                                 flipped, x, y)
  groups = {"monolingual": lambda x, y: y == x,
            "cross_lingual": lambda x, y: y not in (x, "all"),
            "multilingual": lambda x, y: y == "all"}
  out = {}
  for name, member in groups.items():
    members = [s for s in settings.values() if member(s[4], s[5])]
    if members:
      out[name] = tuple(np.mean([m[k] for m in members], axis=0) for k in range(2)) + (
          sum(m[2] for m in members), np.mean([m[3] for m in members], axis=0))
  out.update({name: s[:4] for name, s in settings.items()})
  return {name: (va, vb, n, t, t[0]) for name, (va, vb, n, t) in out.items()}


def exact_pvalue(all_t, observed):
  """count / 2^Q of the patterns at least as extreme (two-sided), ties up to rounding included."""
  return float(np.mean(np.abs(all_t) >= abs(observed) - 1e-9))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  rng = np.random.default_rng(11)
  ap_a, rd_a = synthetic_metrics(rng)
  ap_b, _ = synthetic_metrics(rng, shift=1)
  # Paired, as two systems on the same queries are: B is A moved by a noisy improvement.
  ap_b = np.where(np.isnan(ap_a), np.nan, np.float32(0.5) * (ap_a + ap_b))
  # Rank distance (lower is better): B is better on every English query, noisy on German ones.
  english = np.arange(len(rd_a)) % 2 == 0
  gain = np.where(english, rng.integers(1, 4, size=rd_a.shape),
                  rng.integers(-2, 3, size=rd_a.shape))
  rd_b = np.maximum(rd_a - gain, 0).astype(np.float32)
  canonical = [(i, lang) for i in range(QUESTIONS) for lang in LANGS]
  shuffled = [canonical[k] for k in rng.permutation(len(canonical))]
  root = tmp_path_factory.mktemp("compare")
  dir_a = write_run(root / "a", canonical, ap_a, rd_a)
  dir_b = write_run(root / "b", shuffled, ap_b, rd_b)
  query_lang = np.array([lang for _, lang in canonical])
  return dir_a, dir_b, query_lang, (ap_a, ap_b), (rd_a, rd_b)


@pytest.mark.parametrize("metric", ["map", "rank_distance"])
def test_compare_matches_exact_sign_flip_enumeration(two_runs, metric):
  dir_a, dir_b, query_lang, ap, rank_distance = two_runs
  if metric == "map":
    a, b = ap
    columns = COLUMNS
  else:  # rank distance exists for the pool only: settings X->all and the multilingual summary
    a, b = (v[:, None] for v in rank_distance)
    columns = ["all"]
  expected = exact_statistics(a, b, query_lang, columns)
  rows = {r.name: r for r in significance.compare(dir_a, dir_b, metric, DRAWS, seed=0)}
  assert sorted(rows) == sorted(expected)
  # mAP: 3 summaries and en->{en,de,all}, de->{en,de,all}; rank distance: multilingual, X->all.
  assert len(rows) == (3 + 6 if metric == "map" else 1 + 2)
  worst, most_ties = 0.0, 0
  exact_p = {}
  for name, (value_a, value_b, count, all_t, observed) in expected.items():
    row = rows[name]
    assert row.kind == ("setting" if "->" in name else "summary")
    assert row.a == pytest.approx(value_a, abs=1e-12)
    assert row.b == pytest.approx(value_b, abs=1e-12)
    assert row.num_queries == count
    p = exact_p[name] = exact_pvalue(all_t, observed)
    mean = (1 + DRAWS * p) / (1 + DRAWS)
    sd = np.sqrt(DRAWS * p * (1 - p)) / (1 + DRAWS)
    assert abs(row.p_value - mean) <= 4 * sd + 1e-12, (name, row.p_value, p)
    worst = max(worst, abs(row.p_value - p))
    most_ties = max(most_ties, int(np.sum(np.abs(np.abs(all_t) - abs(observed)) <= 1e-9)))
  print(f"{metric}: exact p {exact_p}; max |compare p - exact p| {worst:.1e}")
  # Not degenerate: small p-values (a setting of 5 queries cannot go below 2/32) and large ones,
  # and sign patterns other than +-identity that tie with the observed statistic (counted as
  # extreme by both sides; a strict > in significance.py would miss them).
  assert min(exact_p.values()) < 0.07 and max(exact_p.values()) > 0.2, exact_p
  assert most_ties > 2, most_ties

  # Holm over the settings only (summaries are reported unadjusted).
  settings = [n for n in expected if "->" in n]
  assert all(np.isnan(rows[n].p_holm) for n in expected if n not in settings)
  np.testing.assert_allclose([rows[n].p_holm for n in settings],
                             holm_from_definition([rows[n].p_value for n in settings]),
                             rtol=0, atol=1e-12)
  # Against Holm of the exact p-values: Holm moves by at most m times the largest p error.
  max_sd = 0.5 / np.sqrt(DRAWS)
  np.testing.assert_allclose([rows[n].p_holm for n in settings],
                             holm_from_definition([exact_p[n] for n in settings]),
                             rtol=0, atol=len(settings) * (4 * max_sd + 1 / DRAWS))
