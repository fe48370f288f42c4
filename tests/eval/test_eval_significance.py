"""Significance tests: exact against enumeration, calibrated by simulation, and the compare command.

Exactness. `compare` is verified against an exact sign-flip enumeration computed here from the
per-query metrics themselves (no weights, no code from significance.py): two tiny runs (5
questions x 2 languages = 10 queries, so 6 X->Y / X->all settings and 3 summaries) written with the
evaluator's own writers, run B's queries stored in a shuffled order. The randomisation unit is the
question (2^5 patterns: both languages of a question flip together) or the query (2^10). When the
patterns are no more than the draws asked for, significance.py enumerates them and its p must equal
the enumeration here; with fewer draws it samples them, and its Monte-Carlo p (1 + count) / (1 + N)
(count = draws with |T*| >= |T|, ties included; never 0, valid for any N, Phipson & Smyth 2010)
must lie within 4 standard deviations of its mean (1 + N p_exact) / (1 + N).

Calibration (simulation, no model). Null pairs with correlated translations: the clustered test
rejects at the nominal 5% (a 99% Clopper-Pearson interval over 1,000 simulated pairs contains
0.05) while the per-query test rejects far more often. Seed noise: the seed-aware interval covers
the true difference ~95% of the time, and testing single checkpoints instead over-rejects.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import metrics as metrics_lib
from hybrid_jax.eval import report
from hybrid_jax.eval import significance

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def binomial_interval(successes: int, trials: int, level: float = 0.99):
  """Clopper-Pearson interval of a rate (exact: never narrower than it should be)."""
  ci = stats.binomtest(int(successes), trials).proportion_ci(level)
  return ci.low, ci.high


# --- the sign-flip primitive ----------------------------------------------------------------------
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
  # The library's own enumeration gives the same exact value.
  assert significance.exact_sign_flip_pvalues(d[None, :])[0] == pytest.approx(exact, abs=1e-15)


def test_clustered_exact_enumeration_and_monte_carlo_approach_it():
  """12 clusters of 1-3 queries, 3 statistics: all 2^12 cluster sign patterns enumerated here."""
  rng = np.random.default_rng(4)
  sizes = rng.integers(1, 4, size=12)
  clusters = np.repeat(np.arange(12), sizes)[rng.permutation(sizes.sum())]  # shuffled order
  contributions = rng.normal([[0.3], [0.0], [0.9]], 1.0, size=(3, len(clusters)))
  contributions[1] = rng.integers(-2, 3, size=len(clusters)) / 4.0  # quarters: many ties
  patterns = np.array(list(itertools.product([-1.0, 1.0], repeat=12)))  # [4096, 12]
  flipped = patterns[:, clusters] @ contributions.T  # every query takes its cluster's sign
  observed = np.abs(contributions.sum(axis=1))
  exact = np.mean(np.abs(flipped) >= observed - 1e-9, axis=0)
  enumerated = significance.sign_flip_test(contributions, clusters, num_permutations=4096)
  assert enumerated.exact and enumerated.floor == 0.0 and enumerated.num_units == 12
  np.testing.assert_allclose(enumerated.pvalues, exact, rtol=0, atol=1e-12)
  assert exact.min() < 0.05 and exact.max() > 0.2, exact  # small and large p-values both
  draws = 200_000
  sampled = significance.sign_flip_test(contributions, clusters, num_permutations=4095)
  assert not sampled.exact and sampled.floor == 1 / 4096
  mc = significance.sign_flip_test(contributions, clusters, num_permutations=draws, seed=2)
  assert mc.exact  # 4096 patterns <= 200k draws: enumerated, not sampled
  summed = significance.sum_by_cluster(contributions, clusters, 12)
  mc = significance.sign_flip_pvalues(summed, num_permutations=draws, seed=2)
  sd = np.sqrt(draws * exact * (1 - exact)) / (1 + draws)
  assert np.all(np.abs(mc - (1 + draws * exact) / (1 + draws)) <= 4 * sd + 1e-12), (mc, exact)
  # Per query instead: a different (here smaller) p for the correlated statistic 0.
  per_query = significance.sign_flip_pvalues(contributions, num_permutations=20_000, seed=2)
  assert per_query[0] != pytest.approx(exact[0], abs=0.01)


def test_cluster_ids_strip_the_query_language_suffix():
  uids = ["56e75_de", "56e75_en", "q7_zh_cn", "q7_en", "beir-17", "x_en_de"]
  langs = ["de", "en", "zh_cn", "en", "en", "de"]
  index, names = significance.cluster_ids(uids, langs)
  assert [names[i] for i in index] == ["56e75", "56e75", "q7", "q7", "beir-17", "x_en"]
  index, names = significance.cluster_ids(uids, langs, "query")
  assert list(index) == list(range(6)) and names == uids
  with pytest.raises(significance.CompareError, match="expected one of"):
    significance.cluster_ids(uids, langs, "article")


def test_holm_adjustment():
  np.testing.assert_allclose(significance.holm([0.01, 0.04, 0.03, 0.5]), [0.04, 0.09, 0.09, 0.5])


def test_monte_carlo_pvalue_convention_is_count_plus_one_over_draws_plus_one():
  # 60 equal differences: only the all-equal-sign patterns (2 of 2^60) reach |T|, so no random
  # draw does (count = 0): (count + 1) / (N + 1) gives 1 / (N + 1), count / N would give 0.
  for draws in (99, 2500):
    p = significance.sign_flip_pvalues(np.ones((1, 60)), num_permutations=draws, seed=3)[0]
    assert p == 1 / (draws + 1)


def test_pvalues_at_the_floor_print_as_bounds():
  floor = 1 / 10_001
  assert significance.format_p(floor, floor) == "<=0.0001"
  assert significance.format_p(0.0260, floor) == "0.0260"
  assert significance.format_p(2 / 32, 0.0) == "0.0625"  # exact enumeration: no bound
  assert significance.format_p(1 / 1_000_001, 1 / 1_000_001) == "<=0.0001"  # rounded up: true
  assert significance.format_p(1 / 101, 1 / 101) == "<=0.0100"
  # Holm of a floor p is a bound too; of an exact p, or clipped at 1, it is not.
  adjusted, bound = significance.holm_with_bounds([floor, 0.02, 0.6], [True, False, False])
  np.testing.assert_allclose(adjusted, [3 * floor, 0.04, 0.6])
  assert list(bound) == [True, False, False]
  _, bound = significance.holm_with_bounds([floor, floor], [True, True])
  assert list(bound) == [True, True]


# --- calibration by simulation --------------------------------------------------------------------
QUESTIONS_SIM, LANGS_SIM = 40, ["en", "de", "zh_cn", "pt_br"]


def test_clustered_test_is_calibrated_when_translations_correlate_and_per_query_over_rejects():
  """1,000 null pairs; per query d = z_question + e_query, z and e N(0, 1): correlation 0.5."""
  uids = [f"q{c}_{lang}" for c in range(QUESTIONS_SIM) for lang in LANGS_SIM]
  langs = [lang for _ in range(QUESTIONS_SIM) for lang in LANGS_SIM]
  clusters, names = significance.cluster_ids(uids, langs)
  assert len(names) == QUESTIONS_SIM
  rng = np.random.default_rng(0)
  sims, rejected = 1000, {"question": 0, "query": 0}
  for i in range(sims):
    d = rng.normal(size=(QUESTIONS_SIM, 1)) + rng.normal(size=(QUESTIONS_SIM, len(LANGS_SIM)))
    contributions = d.reshape(1, -1) / d.size  # the mean difference over queries
    for unit, groups in (("question", clusters), ("query", None)):
      p = significance.sign_flip_test(contributions, groups, num_permutations=999, seed=i)
      rejected[unit] += p.pvalues[0] <= 0.05
  clustered = binomial_interval(rejected["question"], sims)
  per_query = binomial_interval(rejected["query"], sims)
  print(f"rejection at alpha 0.05 over {sims} null pairs: clustered {rejected['question'] / sims} "
        f"(99% CI {clustered[0]:.3f}-{clustered[1]:.3f}), per query {rejected['query'] / sims} "
        f"(99% CI {per_query[0]:.3f}-{per_query[1]:.3f})")
  assert clustered[0] <= 0.05 <= clustered[1]
  # Design effect 1 + (4 - 1) * 0.5 = 2.5: per-query critical values are sqrt(2.5) too narrow,
  # so it rejects ~P(|N(0,1)| > 1.96 / sqrt(2.5)) = 21%.
  assert per_query[0] > 0.15


QUESTIONS_SEED, LANGS_SEED = 100, 3


def simulated_strategy_runs(rng, level, runs, shift, seed_sd):
  """[runs, 1, Q] per-query contributions to the mean of a strategy's runs.

  Per query: the question's `level` [C, L] (shared by every run: the runs score the same
  questions) + the strategy's effect on that question (`shift`, [C, 1]) + a seed effect
  (`seed_sd`: one draw per run, training noise) + per-run question and query noise (a
  checkpoint's own luck)."""
  values = [level + shift + rng.normal(0, seed_sd) + rng.normal(0, 0.03, (level.shape[0], 1))
            + rng.normal(0, 0.03, level.shape) for _ in range(runs)]
  return np.stack([v.reshape(1, -1) / v.size for v in values])


@pytest.mark.parametrize("seeds", [3, 5])
def test_seed_aware_interval_covers_the_true_difference(seeds):
  """400 simulated studies, `seeds` runs per strategy, true difference 0.01 over the question
  population; seed sd 0.01 is larger than the questions' standard error (~0.005)."""
  rng = np.random.default_rng(10 + seeds)
  clusters = np.repeat(np.arange(QUESTIONS_SEED), LANGS_SEED)
  true_diff, sims = 0.01, 400
  covered = checkpoint_rejects = 0
  for i in range(sims):
    level = (rng.normal(0.5, 0.2, (QUESTIONS_SEED, 1))
             + rng.normal(0, 0.1, (QUESTIONS_SEED, LANGS_SEED)))
    effect = true_diff + rng.normal(0, 0.05, (QUESTIONS_SEED, 1))  # mean 0.01 over questions
    a = simulated_strategy_runs(rng, level, seeds, 0.0, 0.01)
    b = simulated_strategy_runs(rng, level, seeds, effect, 0.01)
    boot = significance.seed_bootstrap(
        significance.sum_by_cluster(a, clusters, QUESTIONS_SEED),
        significance.sum_by_cluster(b, clusters, QUESTIONS_SEED), num_resamples=999, seed=i)
    covered += boot.ci_low[0] <= true_diff <= boot.ci_high[0]
    # One checkpoint per side tests "these two checkpoints differ": true null here is about the
    # strategies, so test H0 diff = 0.01 by shifting B back: it ignores training noise.
    shifted = b[0] - true_diff / b[0].size
    checkpoint_rejects += significance.sign_flip_test(
        shifted - a[0], clusters, 999, seed=i).pvalues[0] <= 0.05
  low, high = binomial_interval(covered, sims)
  print(f"{seeds} seeds per side: seed-aware 95% interval covers the true difference in "
        f"{covered}/{sims} = {covered / sims:.3f} (99% CI {low:.3f}-{high:.3f}); a single-"
        f"checkpoint test rejects the true difference in {checkpoint_rejects / sims:.3f}")
  assert low <= 0.95 <= high
  assert checkpoint_rejects / sims > 0.25  # training noise outside the test: far above 5%


def test_seed_bootstrap_standard_error_matches_its_formula():
  """se^2 = var_r T(A_r) / m + var_s T(B_s) / n + C var_c(d_c), computed here from the runs."""
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(3, 2, 30)), rng.normal(0.2, 1.0, size=(4, 2, 30))
  boot = significance.seed_bootstrap(a, b, num_resamples=2000, seed=0)
  d_c = b.mean(0) - a.mean(0)  # [K, C]
  se = np.sqrt(a.sum(-1).var(0, ddof=1) / 3 + b.sum(-1).var(0, ddof=1) / 4
               + 30 * d_c.var(-1, ddof=1))
  np.testing.assert_allclose(boot.diff, b.sum(-1).mean(0) - a.sum(-1).mean(0), rtol=1e-12)
  np.testing.assert_allclose(boot.se, se, rtol=1e-10)
  assert np.all(boot.ci_low < boot.diff) and np.all(boot.diff < boot.ci_high)
  assert boot.floor == 2 / 2001
  # One run on a side: a fixed model, no seed variance on that side.
  fixed = significance.seed_bootstrap(a[:1], b, num_resamples=200, seed=0)
  d_c = b.mean(0) - a[0]
  np.testing.assert_allclose(
      fixed.se, np.sqrt(b.sum(-1).var(0, ddof=1) / 4 + 30 * d_c.var(-1, ddof=1)), rtol=1e-10)


def test_contrast_of_four_groups_matches_its_formula_and_two_groups_equal_seed_bootstrap():
  """A difference of differences over four independent groups of runs (question 2: is one
  strategy's shift penalty smaller than another's?), and B - A as the contrast (-1, +1)."""
  rng = np.random.default_rng(5)
  groups = [rng.normal(mu, 1.0, size=(n, 2, 40)) for mu, n in ((0.0, 5), (0.3, 5), (0.1, 3),
                                                               (0.2, 4))]
  coefficients = (1.0, -1.0, -1.0, 1.0)
  boot = significance.contrast_bootstrap(groups, coefficients, num_resamples=2000, seed=0)
  means = [g.sum(-1).mean(0) for g in groups]  # [K] per group
  np.testing.assert_allclose(boot.diff, sum(c * m for c, m in zip(coefficients, means)),
                             rtol=1e-12)
  d_c = sum(c * g.mean(0) for c, g in zip(coefficients, groups))  # [K, C]
  se = np.sqrt(sum(g.sum(-1).var(0, ddof=1) / len(g) for g in groups)
               + 40 * d_c.var(-1, ddof=1))
  np.testing.assert_allclose(boot.se, se, rtol=1e-10)
  assert np.all(boot.ci_low < boot.diff) and np.all(boot.diff < boot.ci_high)
  a, b = groups[:2]
  two = significance.contrast_bootstrap([a, b], [-1.0, 1.0], num_resamples=500, seed=3)
  one = significance.seed_bootstrap(a, b, num_resamples=500, seed=3)
  for field in ("diff", "se", "ci_low", "ci_high", "pvalues"):
    np.testing.assert_array_equal(getattr(two, field), getattr(one, field))
  with pytest.raises(significance.CompareError, match="one coefficient per group"):
    significance.contrast_bootstrap(groups, coefficients[:3])


def test_difference_of_shift_penalties_interval_covers_the_truth():
  """300 simulated studies of question 2 on one pool: 4 groups of 3-5 seeds (strategy x trained
  in-domain / shifted), true difference of the two penalties 0.01."""
  rng = np.random.default_rng(21)
  clusters = np.repeat(np.arange(QUESTIONS_SEED), LANGS_SEED)
  truth, sims, covered = 0.01, 300, 0
  for i in range(sims):
    level = (rng.normal(0.5, 0.2, (QUESTIONS_SEED, 1))
             + rng.normal(0, 0.1, (QUESTIONS_SEED, LANGS_SEED)))
    effects = {"a_home": 0.05, "a_away": 0.0, "b_home": 0.05 + truth, "b_away": 0.0}
    seeds = {"a_home": 5, "a_away": 5, "b_home": 3, "b_away": 4}
    groups = [significance.sum_by_cluster(
        simulated_strategy_runs(rng, level, seeds[k], effects[k]
                                + rng.normal(0, 0.03, (QUESTIONS_SEED, 1)), 0.01),
        clusters, QUESTIONS_SEED) for k in effects]
    boot = significance.contrast_bootstrap(groups, (-1.0, 1.0, 1.0, -1.0), 499, seed=i)
    covered += boot.ci_low[0] <= truth <= boot.ci_high[0]
  low, high = binomial_interval(covered, sims)
  print(f"difference of penalties: 95% interval covers the truth in {covered}/{sims} = "
        f"{covered / sims:.3f} (99% CI {low:.3f}-{high:.3f})")
  assert low <= 0.95 <= high


# --- compare against exact enumeration ------------------------------------------------------------
LANGS = ["en", "de"]
COLUMNS = LANGS + ["all"]  # per-query setting axis: candidate languages, then the pool
QUESTIONS = 5  # each asked in both languages: Q = 10 queries, 2^5 question / 2^10 query patterns
NO_GERMAN_ANSWER = 4  # this question has no de candidate: its en->de and de->de cells are NaN
DRAWS = 1_000_000  # more than 2^10: compare enumerates


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


CANONICAL = [(i, lang) for i in range(QUESTIONS) for lang in LANGS]


def write_run(directory, order, ap, rank_distance, dataset="tiny"):
  """An evaluation output directory as the evaluator writes it, queries in `order`."""
  directory.mkdir()
  rows = np.array([CANONICAL.index(pair) for pair in order])
  collection = tiny_collection(order)
  num_relevant = np.where(np.isnan(ap[rows]), 0, 1).astype(np.int32)
  per_query = metrics_lib.PerQueryMetrics(
      values={"map": ap[rows]}, num_relevant=num_relevant, rank_distance=rank_distance[rows],
      best_rank=num_relevant.copy())
  report.write_results_json(str(directory), {"dataset": dataset, "languages": LANGS})
  report.write_per_query(str(directory), collection, per_query)
  return str(directory)


def exact_statistics(a, b, query_lang, columns, unit):
  """Every setting and summary under all sign patterns of the units, from their definitions.

  a, b: [Q, len(columns)] per-query values of the two runs, NaN where a query is not scored;
  unit [Q]: the unit each query flips with. Returns {name: (A value, B value, queries, T under
  every pattern, observed T)}: a setting X->Y is the mean over X's scored queries, a summary the
  mean over its settings; flipping a unit swaps A and B for all its queries in every setting.
  """
  a, b = a.astype(np.float64), b.astype(np.float64)
  units = np.array(list(itertools.product([1.0, -1.0], repeat=int(unit.max()) + 1)))
  signs = units[:, unit]  # row 0: the identity
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
  """count / 2^U of the patterns at least as extreme (two-sided), ties up to rounding included."""
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
  shuffled = [CANONICAL[k] for k in rng.permutation(len(CANONICAL))]
  root = tmp_path_factory.mktemp("compare")
  dir_a = write_run(root / "a", CANONICAL, ap_a, rd_a)
  dir_b = write_run(root / "b", shuffled, ap_b, rd_b)
  query_lang = np.array([lang for _, lang in CANONICAL])
  return dir_a, dir_b, query_lang, (ap_a, ap_b), (rd_a, rd_b)


@pytest.mark.parametrize("cluster", ["question", "query"])
@pytest.mark.parametrize("metric", ["map", "rank_distance"])
def test_compare_matches_exact_sign_flip_enumeration(two_runs, metric, cluster):
  dir_a, dir_b, query_lang, ap, rank_distance = two_runs
  if metric == "map":
    a, b = ap
    columns = COLUMNS
  else:  # rank distance exists for the pool only: settings X->all and the multilingual summary
    a, b = (v[:, None] for v in rank_distance)
    columns = ["all"]
  unit = (np.array([i for i, _ in CANONICAL]) if cluster == "question"
          else np.arange(len(CANONICAL)))
  expected = exact_statistics(a, b, query_lang, columns, unit)
  rows = {r.name: r for r in significance.compare(dir_a, dir_b, metric, DRAWS, seed=0,
                                                  cluster=cluster)}
  assert sorted(rows) == sorted(expected)
  # mAP: 3 summaries and en->{en,de,all}, de->{en,de,all}; rank distance: multilingual, X->all.
  assert len(rows) == (3 + 6 if metric == "map" else 1 + 2)
  exact_p, most_ties = {}, 0
  for name, (value_a, value_b, count, all_t, observed) in expected.items():
    row = rows[name]
    assert row.kind == ("setting" if "->" in name else "summary")
    assert row.a == pytest.approx(value_a, abs=1e-12)
    assert row.b == pytest.approx(value_b, abs=1e-12)
    assert row.num_queries == count
    assert row.num_clusters == (QUESTIONS if cluster == "question" else 2 * QUESTIONS)
    exact_p[name] = exact_pvalue(all_t, observed)
    # 2^5 or 2^10 patterns <= DRAWS: compare enumerates them, so p is exact.
    assert row.p_floor == 0.0 and "exact" in row.method
    assert row.p_value == pytest.approx(exact_p[name], abs=1e-12), (name, row.p_value)
    most_ties = max(most_ties, int(np.sum(np.abs(np.abs(all_t) - abs(observed)) <= 1e-9)))
  print(f"{metric}, {cluster} units: exact p {exact_p}")
  # Not degenerate: small p-values and large ones, and sign patterns other than +-identity that
  # tie with the observed statistic (counted as extreme by both sides).
  assert max(exact_p.values()) > 0.2, exact_p
  if cluster == "query":  # a setting of 5 queries cannot go below 2/32
    assert min(exact_p.values()) < 0.07, exact_p
  assert most_ties > 2, most_ties

  # Holm over the family shown: every row compare returned.
  names = list(rows)
  np.testing.assert_allclose([rows[n].p_holm for n in names],
                             holm_from_definition([exact_p[n] for n in names]), rtol=0, atol=1e-12)
  summary = significance.compare(dir_a, dir_b, metric, DRAWS, cluster=cluster, summary_only=True)
  assert [r.kind for r in summary] == ["summary"] * len(summary)
  np.testing.assert_allclose([r.p_holm for r in summary],
                             holm_from_definition([exact_p[r.name] for r in summary]), atol=1e-12)

  if cluster == "query":  # fewer draws than the 1024 patterns: sampled, and close to exact
    draws = 1000
    sampled = {r.name: r for r in significance.compare(dir_a, dir_b, metric, draws, seed=0,
                                                       cluster=cluster)}
    for name, p in exact_p.items():
      mean = (1 + draws * p) / (1 + draws)
      sd = np.sqrt(draws * p * (1 - p)) / (1 + draws)
      assert sampled[name].p_floor == 1 / (1 + draws)
      assert abs(sampled[name].p_value - mean) <= 4 * sd + 1e-12, (name, sampled[name].p_value, p)


def test_question_units_give_larger_pvalues_than_queries_when_translations_agree(tmp_path):
  """B beats A by the same amount on both languages of a question: 5 independent units, not 10."""
  rng = np.random.default_rng(2)
  ap_a, rd = synthetic_metrics(rng)
  per_question = np.repeat(rng.choice([-1.0, 1.0], QUESTIONS) * 3 / 64 + 2 / 64, len(LANGS))
  ap_b = np.clip(ap_a + per_question[:, None], 0, 1).astype(np.float32)
  dir_a = write_run(tmp_path / "a", CANONICAL, ap_a, rd)
  dir_b = write_run(tmp_path / "b", CANONICAL, ap_b, rd)
  by_unit = {unit: {r.name: r for r in significance.compare(dir_a, dir_b, "map", 10_000,
                                                             cluster=unit)}
             for unit in ("question", "query")}
  question, query = by_unit["question"]["multilingual"], by_unit["query"]["multilingual"]
  print(f"multilingual p: question units {question.p_value}, query units {query.p_value}")
  assert question.p_value > 2 * query.p_value


# --- seed-aware compare on result directories -----------------------------------------------------
@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory):
  """Three runs per side: A's seeds, B = A's level + 0.05 on every query, with seed noise."""
  rng = np.random.default_rng(21)
  root = tmp_path_factory.mktemp("seeds")
  base, rd = synthetic_metrics(rng)
  dirs, values = {"a": [], "b": []}, {"a": [], "b": []}
  for side, shift in (("a", 0.0), ("b", 0.05)):
    for s in range(3):
      ap = np.clip(base + shift + rng.normal(0, 0.01) + rng.normal(0, 0.02, base.shape), 0, 1)
      ap = np.where(np.isnan(base), np.nan, ap).astype(np.float32)
      order = [CANONICAL[k] for k in rng.permutation(len(CANONICAL))]
      dirs[side].append(write_run(root / f"{side}{s}", order, ap, rd))
      values[side].append(ap)
  return dirs, values


def setting_means(ap):
  """{setting: mean} and summaries of one run's [Q, 3] mAP, straight from the definitions."""
  query_lang = np.array([lang for _, lang in CANONICAL])
  out = {}
  for x in LANGS:
    for j, y in enumerate(COLUMNS):
      col = ap[query_lang == x, j]
      if np.any(~np.isnan(col)):
        out[f"{x}->{y}"] = float(np.nanmean(col.astype(np.float64)))
  out["monolingual"] = np.mean([out[f"{x}->{x}"] for x in LANGS])
  out["cross_lingual"] = np.mean([out["en->de"], out["de->en"]])
  out["multilingual"] = np.mean([out["en->all"], out["de->all"]])
  return out


def test_seed_aware_compare_reports_seed_means_interval_and_p(seed_runs, tmp_path):
  dirs, values = seed_runs
  rows = {r.name: r for r in significance.compare(dirs["a"], dirs["b"], "map", 4000, seed=1)}
  means = {side: [setting_means(v) for v in values[side]] for side in values}
  assert len(rows) == 9
  for name, row in rows.items():
    assert row.a == pytest.approx(np.mean([m[name] for m in means["a"]]), abs=1e-9)
    assert row.b == pytest.approx(np.mean([m[name] for m in means["b"]]), abs=1e-9)
    assert row.ci_low < row.diff < row.ci_high
    assert row.p_floor == 2 / 4001 and "bootstrap-t over 3 vs 3 runs" in row.method
  # B is 0.05 better everywhere with noise ~0.01-0.02: clearly significant, interval excludes 0
  # and contains 0.05 for the summaries.
  for name in ("monolingual", "cross_lingual", "multilingual"):
    assert rows[name].p_value < 0.05 and rows[name].ci_low > 0, rows[name]
    assert rows[name].ci_low < 0.05 < rows[name].ci_high, rows[name]
  # A against copies of itself: no difference, p near 1, interval around 0.
  copies = [shutil.copytree(d, str(tmp_path / f"copy{i}")) for i, d in enumerate(dirs["a"])]
  same = significance.compare(dirs["a"], copies[::-1], "map", 500, summary_only=True)
  assert all(abs(r.diff) < 1e-12 and r.p_value > 0.8 and r.ci_low < 0 < r.ci_high
             for r in same), same


def test_contrast_of_run_groups_from_directories(seed_runs):
  """significance.contrast: (-1, +1) over two groups is compare's seed-aware B - A; four groups
  give the difference of differences of the seed means, from the per-query files."""
  dirs, values = seed_runs
  two = significance.contrast([dirs["a"], dirs["b"]], (-1.0, 1.0), "map", 2000, seed=4)
  rows = {r.name: r for r in significance.compare(dirs["a"], dirs["b"], "map", 2000, seed=4,
                                                  summary_only=True)}
  assert [r.name for r in two] == ["monolingual", "cross_lingual", "multilingual"]
  for r in two:
    assert (r.value, r.ci_low, r.ci_high, r.p_value) == pytest.approx(
        (rows[r.name].diff, rows[r.name].ci_low, rows[r.name].ci_high, rows[r.name].p_value),
        abs=1e-12)
  # (b0,b1 - a0,a1) - (b2 - a2): groups of 2, 2, 1 and 1 runs.
  groups = [dirs["b"][:2], dirs["a"][:2], dirs["b"][2:], dirs["a"][2:]]
  four = {r.name: r for r in significance.contrast(groups, (1.0, -1.0, -1.0, 1.0), "map", 1000)}
  means = {side: [setting_means(v) for v in values[side]] for side in values}
  for name, r in four.items():
    expected = (np.mean([m[name] for m in means["b"][:2]]) - np.mean(
        [m[name] for m in means["a"][:2]])) - (means["b"][2][name] - means["a"][2][name])
    assert r.value == pytest.approx(expected, abs=1e-9)
    assert r.ci_low < r.value < r.ci_high and "(1.0, -1.0, -1.0, 1.0)" in r.method
    assert len(r.group_means) == 4
  with pytest.raises(significance.CompareError, match="one non-empty group per coefficient"):
    significance.contrast([dirs["a"], []], (-1.0, 1.0))


def test_language_group_statistics_follow_the_grid_definitions(seed_runs):
  """groups={"g": ["de"]}: g/monolingual = de->de, g/cross_lingual = mean(en->de, de->en) (X or Y
  in the group), g/multilingual = de->all, as hybrid_jax/eval/grid.py averages groups."""
  dirs, values = seed_runs
  rows = {r.name: r for r in significance.compare(dirs["a"], dirs["b"], "map", 500,
                                                  summary_only=True, groups={"g": ["de"]})}
  assert list(rows) == ["monolingual", "cross_lingual", "multilingual", "g/monolingual",
                        "g/cross_lingual", "g/multilingual"]
  for side, attr in (("a", "a"), ("b", "b")):
    means = [setting_means(v) for v in values[side]]
    for name, settings in (("g/monolingual", ["de->de"]), ("g/cross_lingual", ["en->de", "de->en"]),
                           ("g/multilingual", ["de->all"])):
      expected = np.mean([np.mean([m[k] for k in settings]) for m in means])
      assert getattr(rows[name], attr) == pytest.approx(expected, abs=1e-9), (name, side)
  four = {r.name: r for r in significance.contrast([dirs["a"], dirs["b"]], (-1.0, 1.0), "map",
                                                   500, groups={"g": ["de"]})}
  assert four["g/multilingual"].value == pytest.approx(rows["g/multilingual"].diff, abs=1e-12)


def test_compare_errors_say_what_to_fix(seed_runs, tmp_path):
  dirs, _ = seed_runs
  with pytest.raises(significance.CompareError, match="more than once"):
    significance.compare([dirs["a"][0], dirs["a"][0]], dirs["b"])
  rng = np.random.default_rng(0)
  ap, rd = synthetic_metrics(rng)
  other = write_run(tmp_path / "other", CANONICAL, ap, rd, dataset="other")
  with pytest.raises(significance.CompareError, match="compare runs on the same dataset"):
    significance.compare(dirs["a"], [dirs["b"][0], other])
  with pytest.raises(significance.CompareError, match="expected one of"):
    significance.compare(dirs["a"][0], dirs["b"][0], cluster="language")


def _compare_cli(*args):
  return subprocess.run([sys.executable, "-m", "hybrid_jax.compare", *args], capture_output=True,
                        text=True, cwd=REPO, timeout=300, check=False)


def test_compare_cli_takes_several_runs_per_side(seed_runs, two_runs, tmp_path):
  dirs, _ = seed_runs
  out_json = tmp_path / "rows.json"
  result = _compare_cli(",".join(dirs["a"]), ",".join(dirs["b"]), "--summary_only",
                        "--permutations=2000", f"--output_json={out_json}")
  assert result.returncode == 0, result.stderr
  assert "95% interval" in result.stdout
  assert "over training seeds and questions" in result.stdout
  assert "adjusts over the 3 tests shown" in result.stdout
  with open(out_json, encoding="utf-8") as f:
    rows = json.load(f)
  assert [r["name"] for r in rows] == ["monolingual", "cross_lingual", "multilingual"]
  assert all(r["ci_low"] < r["diff"] < r["ci_high"] for r in rows)
  # One run per side: the clustered sign-flip test, "<=" at the floor of 99 flips.
  result = _compare_cli(dirs["a"][0], dirs["b"][0], "--permutations=99", "--cluster=query")
  assert result.returncode == 0, result.stderr
  assert "<=0.0100" in result.stdout and "10 query units" in result.stdout
  assert "is checkpoint B better than checkpoint A on these questions" in result.stdout
  # A contrast of three groups: (b - a) - (a - a) = b - a, with its interval.
  result = _compare_cli("--contrast=1,-1,-1,1", ",".join(dirs["b"]), ",".join(dirs["a"]),
                        dirs["a"][0], dirs["a"][0], "--summary_only", "--permutations=500",
                        "--groups=g=de")
  assert result.returncode == 0, result.stderr
  assert any(l.startswith("g/multilingual") for l in result.stdout.splitlines()), result.stdout
  multi = next(l for l in result.stdout.splitlines() if l.startswith("multilingual"))
  assert float(multi.split()[1]) == pytest.approx(
      next(r for r in rows if r["name"] == "multilingual")["diff"], abs=1e-4), multi
  assert "contrast +1 -1 -1 +1" in result.stdout and "adjusts over the 6 tests" in result.stdout
  result = _compare_cli("--contrast=1,-1", dirs["a"][0], dirs["b"][0], dirs["b"][1])
  assert result.returncode != 0 and "2 coefficients but 3 groups" in result.stderr
  result = _compare_cli(dirs["a"][0], dirs["b"][0], "--groups=unseen")
  assert result.returncode == 2 and "expected NAME=lang+lang" in result.stderr
  dir_a, dir_b = two_runs[:2]
  result = _compare_cli(dir_a, dir_b, "--cluster=article")
  assert result.returncode != 0 and "question" in result.stderr
