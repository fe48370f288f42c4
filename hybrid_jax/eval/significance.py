"""Significance tests between evaluations of the same collection: which question each answers.

Every statistic is a weighted sum of per-query values, T = sum_q w_q x_q (a setting mean, or a
macro average over settings, which weights each query by 1 / (num_settings * queries_in_setting)),
and the difference of two evaluations is B - A.

One run per side: "is checkpoint B better than checkpoint A on these questions?"
  A paired sign-flip (permutation) test. Under the null the two checkpoints are exchangeable on
  every randomisation unit, so swapping A and B for a unit flips the sign of all its differences
  at once (in every setting it belongs to). The unit is
    * the question (default, `cluster="question"`): all query languages of one question id
      `{id}_{lang}` (LAReQA, its held-out parts, MKQA's example ids) flip together. The
      translations of one question share their gold sentences and move together; treating them
      as independent makes the null distribution far too narrow. A query uid without a `_{lang}`
      suffix of its own language (BEIR) is its own unit.
    * the query (`cluster="query"`): each (question, language) query flips alone. Valid only when
      queries are independent; on LAReQA it over-rejects (tests/eval/test_eval_significance.py
      measures it at alpha 0.05).
  Two-sided Monte-Carlo p = (1 + #{|T*| >= |T|}) / (1 + num_permutations): never 0, and at its
  floor 1 / (1 + num_permutations) it only says p <= that floor (printed "<=0.0001"). When the
  2^units sign patterns are no more than num_permutations they are all enumerated and p is exact
  (#{|T*| >= |T|} / 2^units, identity included).

Several runs per side (training seeds): "is strategy B better than strategy A, over training
seeds and questions?"
  The difference of the seed means, D = mean_s T(B_s) - mean_r T(A_r), with a 95% interval and
  p from a two-level studentised bootstrap (bootstrap-t): each draw resamples question clusters
  with replacement (the same clusters for every run, as every run scored the same questions) and,
  independently, each side's seeds with replacement. Its standard error
    se^2 = var_r T(A_r) / m + var_s T(B_s) / n + C * var_c(d_c),
  (seed variances over the m and n runs; d_c the seed-mean difference on cluster c, C clusters)
  is recomputed on every draw, t* = (D* - D) / se*, and the interval is
  [D - t*_(0.975) se, D - t*_(0.025) se]. Studentising matters with 3-5 seeds: a percentile
  interval of the two-level bootstrap covers only ~85% when seed noise dominates (a resample of 3
  seeds has 10 distinct outcomes and its variance is 2/3 of the sample's); the bootstrap-t covers
  94.2% with 3 seeds and 94.8% with 5 (4,000 simulated studies each; the calibration tests measure
  it on 400). p = 2 min(1 + #{t* >= t}, 1 + #{t* <= t}) / (1 + N), t = D / se, so p < 0.05 when
  0 is outside the 95% interval (up to the discreteness of N draws). Seeds are not paired across
  sides (seed 0 of A and seed 0 of B are independent draws of training noise). A side of one run
  is a fixed model with no training noise (e.g. zero-shot); say so when reading the result. The
  statistic keeps the single-run weights (each query's 1 / queries_in_setting), so where clusters
  hold different numbers of a setting's queries (MLQA-R) a resample also varies with those counts.

Holm-adjusted p-values are over the family a report shows: the rows returned (and printed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from hybrid_jax import errors
from hybrid_jax.eval import grid as grid_lib
from hybrid_jax.eval import report

CLUSTER_UNITS = ("question", "query")
MAX_EXACT_UNITS = 20  # 2^20 sign patterns: enumerated in well under a second per statistic


class CompareError(errors.UserError):
  """The result directories cannot be compared."""


# --- randomisation units ------------------------------------------------------------------------
def cluster_ids(query_uids: Sequence[str], query_langs: Sequence[str],
                unit: str = "question") -> tuple[np.ndarray, list[str]]:
  """The randomisation unit of every query: (index [Q] into the unit names, the unit names).

  "question": the uid without its `_{lang}` suffix (`56e7586d..._de` -> `56e7586d...`; MKQA's
  `{example_id}_zh_cn` with language zh_cn -> `{example_id}`); a uid without that suffix is its
  own unit. "query": every query is its own unit.
  """
  if unit not in CLUSTER_UNITS:
    raise CompareError(f"cluster unit {unit!r}; expected one of {CLUSTER_UNITS} (question: all "
                       "languages of a question id flip together; query: each query alone)")
  uids = [str(u) for u in query_uids]
  if unit == "query":
    return np.arange(len(uids)), uids
  keys = []
  for uid, lang in zip(uids, query_langs):
    suffix = "_" + str(lang)
    keys.append(uid[:-len(suffix)] if uid.endswith(suffix) and len(uid) > len(suffix) else uid)
  names, index = np.unique(np.array(keys, dtype=object), return_inverse=True)
  return index.reshape(-1), [str(n) for n in names]


def sum_by_cluster(contributions: np.ndarray, clusters: np.ndarray, num_clusters: int
                   ) -> np.ndarray:
  """[..., Q] per-query contributions -> [..., C] their sums per cluster."""
  contributions = np.asarray(contributions, np.float64)
  clusters = np.asarray(clusters)
  flat = contributions.reshape(-1, contributions.shape[-1])
  # Sorted by cluster, each cluster's queries are one run of columns: reduceat sums them (np.add.at
  # is ~50x slower on the [runs x statistics, queries] arrays of a seed-aware compare).
  order = np.argsort(clusters, kind="stable")
  present, starts = np.unique(clusters[order], return_index=True)
  out = np.zeros((len(flat), num_clusters))
  if len(order):
    out[:, present] = np.add.reduceat(flat[:, order], starts, axis=1)
  return out.reshape(contributions.shape[:-1] + (num_clusters,))


# --- sign-flip tests ----------------------------------------------------------------------------
def sign_flip_pvalues(contributions: np.ndarray, num_permutations: int = 10_000,
                      seed: int = 0) -> np.ndarray:
  """Monte-Carlo two-sided p-values of T_k = sum_u contributions[k, u] under random sign flips.

  Args:
    contributions: [K, U] weighted differences of K statistics over the same U randomisation
      units (queries, or clusters of them: sum_by_cluster), 0 where a unit does not enter a
      statistic. The same sign draws are used for every statistic, as they are the same random
      swaps of the two systems.
  """
  contributions = np.asarray(contributions, np.float64)
  observed = np.abs(contributions.sum(axis=1))  # [K]
  # Sums of the same values in another order differ by rounding; do not count that as smaller.
  tolerance = 1e-12 * np.abs(contributions).sum(axis=1)
  rng = np.random.default_rng(seed)
  exceed = np.zeros(len(contributions), np.int64)
  done = 0
  while done < num_permutations:
    n = min(1000, num_permutations - done)
    signs = rng.integers(0, 2, size=(n, contributions.shape[1]), dtype=np.int8) * 2 - 1
    permuted = np.abs(signs.astype(np.float64) @ contributions.T)  # [n, K]
    exceed += np.sum(permuted >= observed[None, :] - tolerance[None, :], axis=0)
    done += n
  return (1.0 + exceed) / (1.0 + num_permutations)


def exact_sign_flip_pvalues(contributions: np.ndarray) -> np.ndarray:
  """Exact two-sided p-values over all 2^U sign patterns: #{|T*| >= |T|} / 2^U."""
  contributions = np.asarray(contributions, np.float64)
  units = contributions.shape[1]
  if units > MAX_EXACT_UNITS:
    raise ValueError(f"{units} units: 2^{units} sign patterns are too many to enumerate")
  observed = np.abs(contributions.sum(axis=1))
  tolerance = 1e-12 * np.abs(contributions).sum(axis=1)
  bits = np.arange(units)
  exceed = np.zeros(len(contributions), np.int64)
  total = 1 << units
  for start in range(0, total, 1 << 16):
    patterns = np.arange(start, min(total, start + (1 << 16)))
    signs = ((patterns[:, None] >> bits[None, :]) & 1) * 2.0 - 1.0  # [n, U]
    exceed += np.sum(np.abs(signs @ contributions.T) >= observed - tolerance, axis=0)
  return exceed / total


@dataclasses.dataclass(frozen=True)
class SignFlipResult:
  pvalues: np.ndarray  # [K]
  floor: float  # the smallest p the Monte-Carlo test can report (0.0: exact enumeration)
  exact: bool
  num_units: int


def sign_flip_test(contributions: np.ndarray, clusters: np.ndarray | None = None,
                   num_permutations: int = 10_000, seed: int = 0) -> SignFlipResult:
  """Sign-flip p-values of [K, Q] per-query contributions, flipping whole clusters.

  `clusters` [Q]: each query's unit (cluster_ids); None: every query alone. Enumerates all sign
  patterns (exact p) when there are no more of them than `num_permutations`.
  """
  contributions = np.asarray(contributions, np.float64)
  if clusters is not None:
    contributions = sum_by_cluster(contributions, clusters, int(np.max(clusters)) + 1)
  units = contributions.shape[1]
  if units <= MAX_EXACT_UNITS and (1 << units) <= num_permutations:
    return SignFlipResult(exact_sign_flip_pvalues(contributions), 0.0, True, units)
  return SignFlipResult(sign_flip_pvalues(contributions, num_permutations, seed),
                        1.0 / (1.0 + num_permutations), False, units)


# --- seed-aware: two-level bootstrap-t ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SeedBootstrapResult:
  diff: np.ndarray  # [K] D = mean over B's runs - mean over A's runs (or the contrast)
  se: np.ndarray  # [K]
  ci_low: np.ndarray  # [K] 95% (or 1 - alpha) bootstrap-t interval
  ci_high: np.ndarray
  pvalues: np.ndarray  # [K]
  floor: float  # 2 / (1 + num_resamples)


def _seed_variance(totals: np.ndarray, weights: np.ndarray, runs: int) -> np.ndarray:
  """var(ddof=1) / runs of resampled runs' totals. totals [B, R, K]; weights [B, R] (counts /
  runs, summing to 1). 0 for a side of one run (a fixed model)."""
  if runs < 2:
    return np.zeros(totals.shape[::2])
  mean = np.einsum("br,brk->bk", weights, totals)
  spread = np.einsum("br,brk->bk", weights, (totals - mean[:, None, :]) ** 2) * runs
  return spread / (runs - 1) / runs


def seed_bootstrap(runs_a: np.ndarray, runs_b: np.ndarray, num_resamples: int = 10_000,
                   seed: int = 0, alpha: float = 0.05) -> SeedBootstrapResult:
  """Two-level bootstrap-t of the difference of seed means, B - A (module docstring).

  Args:
    runs_a: [m, K, C] per-cluster contributions of A's m runs to K statistics (the statistic of
      run r is runs_a[r, k].sum()); C clusters, the same for every run.
    runs_b: [n, K, C] the same for B.
  """
  return contrast_bootstrap([runs_a, runs_b], [-1.0, 1.0], num_resamples, seed, alpha)


def contrast_bootstrap(groups: Sequence[np.ndarray], coefficients: Sequence[float],
                       num_resamples: int = 10_000, seed: int = 0,
                       alpha: float = 0.05) -> SeedBootstrapResult:
  """Two-level bootstrap-t of a contrast of seed means, D = sum_j c_j mean_r T(group_j run r).

  B - A is groups (A, B) with coefficients (-1, +1). Four groups with (+1, -1, -1, +1) give a
  difference of differences, e.g. "is B's shift penalty smaller than A's?": (B in-domain - B
  shifted) - (A in-domain - A shifted) on one pool. Each group's seeds are resampled on their own
  (independent trainings), the question clusters jointly (every run scored the same questions);
  se^2 = sum_j c_j^2 var_r T(group_j) / n_j + C var_c(d_c), d_c the contrast on cluster c.

  Args:
    groups: each [n_j, K, C] per-cluster contributions of a group's runs (the same K statistics
      and C clusters in every group); a group of one run is a fixed model.
    coefficients: c_j, one per group.
  """
  if len(groups) != len(coefficients) or not groups:
    raise CompareError(f"{len(groups)} groups but {len(coefficients)} coefficients; give one "
                       "coefficient per group of runs")
  xs = [np.asarray(g, np.float64) for g in groups]
  sizes = [len(x) for x in xs]
  num_clusters = xs[0].shape[-1]
  if num_clusters < 2:
    raise CompareError(f"{num_clusters} question cluster: the bootstrap needs at least 2")
  x = np.concatenate(xs)  # [R, K, C]
  num_runs, num_stats = x.shape[:2]
  offsets = np.cumsum([0] + sizes)
  flat = x.reshape(num_runs, num_stats * num_clusters)  # run r's d_c entries, for g @ flat
  by_cluster = x.reshape(num_runs * num_stats, num_clusters).T  # [C, R K], for counts @ it

  def studentise(cluster_counts, g, totals):
    """D*, se* of draws: cluster_counts [B, C], run weights g [B, R] (c_j / n_j per draw of a
    run of group j), totals [B, R, K]."""
    diff = np.einsum("br,brk->bk", g, totals)
    var = sum(c * c * _seed_variance(totals[:, lo:hi], g[:, lo:hi] / c, n) if c else 0.0
              for c, n, lo, hi in zip(coefficients, sizes, offsets[:-1], offsets[1:]))
    per_cluster = (g @ flat).reshape(len(g), num_stats, num_clusters)  # d*_c [B, K, C]
    square = np.einsum("bc,bkc->bk", cluster_counts, per_cluster * per_cluster)
    questions = num_clusters / (num_clusters - 1) * (square - diff ** 2 / num_clusters)
    return diff, np.sqrt(np.maximum(var + np.maximum(questions, 0.0), 0.0))

  identity_g = np.concatenate([np.full(n, c / n) for c, n in zip(coefficients, sizes)])[None, :]
  diff, se = studentise(np.ones((1, num_clusters)), identity_g, x.sum(-1)[None])
  diff, se = diff[0], se[0]
  rng = np.random.default_rng(seed)
  t_star = np.empty((num_resamples, num_stats))
  done = 0
  # Draws per block: d*_c of a block is [block, K, C] (about 32 MB at most).
  block = int(min(500, max(1, 4_000_000 // (num_stats * num_clusters))))
  while done < num_resamples:
    size = min(block, num_resamples - done)
    counts = _counts(rng.integers(0, num_clusters, size=(size, num_clusters)), num_clusters)
    g = np.concatenate([c * _counts(rng.integers(0, n, size=(size, n)), n) / n
                        for c, n in zip(coefficients, sizes)], axis=1)  # [B, R]
    totals = (counts @ by_cluster).reshape(size, num_runs, num_stats)
    d_star, se_star = studentise(counts, g, totals)
    shift = d_star - diff[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
      t = np.where(se_star > 0, shift / se_star, np.sign(shift) * np.inf)
    t_star[done:done + size] = np.where(np.isnan(t), 0.0, t)
    done += size
  with np.errstate(divide="ignore", invalid="ignore"):
    t_obs = np.where(se > 0, diff / se, np.sign(diff) * np.inf)
  t_obs = np.where(np.isnan(t_obs), 0.0, t_obs)
  upper = np.sum(t_star >= t_obs[None, :], axis=0)
  lower = np.sum(t_star <= t_obs[None, :], axis=0)
  pvalues = np.minimum(1.0, 2.0 * (1.0 + np.minimum(upper, lower)) / (1.0 + num_resamples))
  # Order statistics of t*: the floor((N + 1) alpha / 2)-th and ceil((N + 1) (1 - alpha / 2))-th
  # smallest (the 250th and 9,750th of 9,999), as in the p-value's (1 + count) / (1 + N).
  ordered = np.sort(t_star, axis=0)
  k_low = min(num_resamples, max(1, math.floor((num_resamples + 1) * alpha / 2)))
  k_high = min(num_resamples, max(1, math.ceil((num_resamples + 1) * (1 - alpha / 2))))
  with np.errstate(invalid="ignore"):  # inf * 0 where se = 0: the interval is the point
    ci_low = np.where(se > 0, diff - ordered[k_high - 1] * se, diff)
    ci_high = np.where(se > 0, diff - ordered[k_low - 1] * se, diff)
  return SeedBootstrapResult(diff, se, ci_low, ci_high, pvalues, 2.0 / (1.0 + num_resamples))


def _counts(picks: np.ndarray, num: int) -> np.ndarray:
  """[B, num] how often each of num items (clusters, runs) was drawn in each row of picks [B, n].

  One bincount over row-offset indices: 4x faster than rng.multinomial for the cluster draws."""
  offsets = picks + num * np.arange(len(picks))[:, None]
  return np.bincount(offsets.ravel(), minlength=len(picks) * num).reshape(len(picks), num).astype(
      np.float64)


# --- multiple testing -----------------------------------------------------------------------------
def holm(pvalues: Sequence[float]) -> np.ndarray:
  """Holm-Bonferroni adjusted p-values (family-wise error over the given tests)."""
  return holm_with_bounds(pvalues)[0]


def holm_with_bounds(pvalues: Sequence[float], at_floor: Sequence[bool] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Holm-adjusted p-values and, per test, whether the adjusted value is only an upper bound
  (it comes from a raw p at its Monte-Carlo floor, which is itself only a bound)."""
  p = np.asarray(pvalues, np.float64)
  floor = np.zeros(len(p), bool) if at_floor is None else np.asarray(at_floor, bool)
  order = np.argsort(p, kind="stable")
  adjusted = np.empty_like(p)
  bound = np.zeros(len(p), bool)
  running, running_bound = 0.0, False
  for rank, i in enumerate(order):
    scaled = min(1.0, (len(p) - rank) * p[i])
    if scaled > running or rank == 0:
      running, running_bound = scaled, bool(floor[i]) and scaled < 1.0
    adjusted[i], bound[i] = running, running_bound
  return adjusted, bound


def format_p(p: float, floor: float = 0.0, digits: int = 4) -> str:
  """'0.0260', or '<=0.0001' at the Monte-Carlo floor (the bound rounded up, so it stays true)."""
  if math.isnan(p):
    return ""
  if floor > 0 and p <= floor * (1 + 1e-9):
    scale = 10 ** digits
    bound = math.ceil(floor * scale * (1 - 1e-12)) / scale
    return f"<={bound:.{digits}f}" if bound > 0 else f"<={floor:.1e}"
  return f"{p:.{digits}f}"


# --- comparing result directories -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
  """One statistic of a comparison (B - A). With several runs per side a and b are seed means."""
  name: str  # "monolingual", "en->de", "en->all", ...
  kind: str  # "summary" | "setting"
  a: float
  b: float
  num_queries: int
  p_value: float
  p_holm: float = math.nan
  p_floor: float = 0.0  # p <= p_floor is only a bound (0: the p-value is exact)
  holm_is_bound: bool = False
  ci_low: float = math.nan  # seed-aware only: 95% bootstrap-t interval of B - A
  ci_high: float = math.nan
  num_clusters: int = 0  # randomisation units (question ids, or queries)
  method: str = ""

  @property
  def diff(self) -> float:
    return self.b - self.a

  @property
  def at_floor(self) -> bool:
    return self.p_floor > 0 and self.p_value <= self.p_floor * (1 + 1e-9)


def _as_list(dirs: str | Sequence[str]) -> list[str]:
  return [dirs] if isinstance(dirs, str) else list(dirs)


def _load_runs(dirs: Sequence[str], metric: str):
  """results.json of the first run; per_query of every run, rows in the first run's order."""
  first = report.read_results_json(dirs[0])
  base = report.read_per_query(dirs[0])
  if metric not in base["metrics"]:
    raise CompareError(f"unknown metric {metric!r}; {dirs[0]}/per_query.npz holds "
                       f"{sorted(base['metrics'])}")
  uids = [str(u) for u in base["query_uids"]]
  row_of = {u: i for i, u in enumerate(uids)}
  values = []
  for d in dirs:
    results = first if d == dirs[0] else report.read_results_json(d)
    if results["dataset"] != first["dataset"]:
      raise CompareError(f"{dirs[0]} evaluates {first['dataset']!r} but {d} evaluates "
                         f"{results['dataset']!r}; compare runs on the same dataset.")
    pq = base if d == dirs[0] else report.read_per_query(d)
    if list(pq["setting_columns"]) != list(base["setting_columns"]):
      raise CompareError(f"the runs cover different candidate languages: {dirs[0]} has "
                         f"{list(base['setting_columns'])}, {d} {list(pq['setting_columns'])}")
    if metric not in pq["metrics"]:
      raise CompareError(f"unknown metric {metric!r}; {d}/per_query.npz holds "
                         f"{sorted(pq['metrics'])}")
    other = [str(u) for u in pq["query_uids"]]
    if other != uids:
      common = sum(u in row_of for u in other)
      if common != len(uids) or len(other) != len(uids):
        raise CompareError(f"the runs scored different queries ({dirs[0]}: {len(uids)}, {d}: "
                           f"{len(other)}, {common} in common); evaluate every run on the same "
                           "dataset, part and languages.")
      position = {u: i for i, u in enumerate(other)}
      values.append(pq["metrics"][metric][np.array([position[u] for u in uids])])
    else:
      values.append(pq["metrics"][metric])
  return first, base, values


def _statistics(languages, columns, query_lang, scored, summary_only, groups=None):
  """(name, kind, [(column, query mask, weight scale)]) of the three summaries, each language
  group's three ("<group>/multilingual", ...: hybrid_jax/eval/grid.py's membership rules) and
  every setting.

  A setting weighs its queries 1/n; a macro average weighs each member setting 1/num_members on
  top."""
  settings = []  # (name, query language, column, row mask)
  for x in [lang for lang in languages if np.any(query_lang == lang)]:
    for j, y in enumerate(columns):
      rows = (query_lang == x) & scored[:, j]
      if rows.any():
        settings.append((f"{x}->{y}", x, j, rows))
  families_of = {
      "monolingual": [s for s in settings if columns[s[2]] == s[1]],
      "cross_lingual": [s for s in settings if columns[s[2]] not in (s[1], grid_lib.POOL)],
      "multilingual": [s for s in settings if columns[s[2]] == grid_lib.POOL],
  }
  summaries = list(families_of.items())
  for group, langs_in in (groups or {}).items():  # as grid.py: X->Y counts if X or Y is in it
    families = {
        "monolingual": [s for s in families_of["monolingual"] if s[1] in langs_in],
        "cross_lingual": [s for s in families_of["cross_lingual"]
                          if s[1] in langs_in or columns[s[2]] in langs_in],
        "multilingual": [s for s in families_of["multilingual"] if s[1] in langs_in],
    }
    summaries += [(f"{group}/{f}", members) for f, members in families.items()]
  statistics = [(g, "summary", [(m, 1.0 / len(members)) for m in members])
                for g, members in summaries if members]
  if not summary_only:
    statistics += [(s[0], "setting", [(s, 1.0)]) for s in settings]
  return statistics


def _contributions(values: np.ndarray, statistics) -> np.ndarray:
  """[K, Q] each query's weighted contribution to each statistic (values [Q, S], 0 = unscored)."""
  out = np.zeros((len(statistics), len(values)))
  for k, (_, _, parts) in enumerate(statistics):
    for (_, _, j, rows), scale in parts:
      out[k] += np.where(rows, values[:, j], 0.0) * (scale / rows.sum())
  return out


def compare(dirs_a: str | Sequence[str], dirs_b: str | Sequence[str], metric: str = "map",
            num_permutations: int = 10_000, seed: int = 0, cluster: str = "question",
            summary_only: bool = False,
            groups: Mapping[str, Sequence[str]] | None = None) -> list[Row]:
  """B - A of `metric` for the three summaries, each group's three (`groups`: {name: query /
  candidate languages}, e.g. {"unseen": ["el", "ru", "th", "tr"]}) and (unless summary_only)
  every setting.

  One directory per side: the paired sign-flip test over `cluster` units. Several per side (one
  evaluation directory per training seed): the seed-aware two-level bootstrap-t, with
  `num_permutations` resamples. p_holm adjusts over the rows returned.
  """
  dirs_a, dirs_b = _as_list(dirs_a), _as_list(dirs_b)
  if not dirs_a or not dirs_b:
    raise CompareError("each side needs at least one evaluation directory")
  for side, dirs in (("A", dirs_a), ("B", dirs_b)):
    # One side's runs are its seeds: a directory twice would count one seed twice. (The same
    # directory on both sides is allowed: a run against itself.)
    repeated = sorted({d for d in dirs if dirs.count(d) > 1})
    if repeated:
      raise CompareError(f"side {side} names {repeated} more than once; give each seed's "
                         "evaluation directory once (A_seed0,A_seed1,... B_seed0,...)")
  if num_permutations < 1:
    raise CompareError(f"num_permutations={num_permutations}; expected at least 1 (10,000 is "
                       "the default)")
  statistics, per_run, clusters, unit_names = _per_query_contributions(
      dirs_a + dirs_b, metric, cluster, summary_only, groups)
  totals = per_run.sum(-1)  # [R, K]
  m = len(dirs_a)
  a_values, b_values = totals[:m].mean(0), totals[m:].mean(0)
  counts = [int(sum(s[3].sum() for s, _ in parts)) for _, _, parts in statistics]
  unit_text = f"{len(unit_names)} {'question' if cluster == 'question' else 'query'} units"
  if m == 1 and len(dirs_b) == 1:
    test = sign_flip_test(per_run[1] - per_run[0], clusters, num_permutations, seed)
    pvalues, floor = test.pvalues, test.floor
    lows = highs = np.full(len(statistics), math.nan)
    method = (f"paired sign-flip over {unit_text}, "
              + (f"exact over all 2^{test.num_units} patterns" if test.exact
                 else f"{num_permutations} random flips, seed {seed}"))
  else:
    by_cluster = sum_by_cluster(per_run, clusters, len(unit_names))  # [R, K, C]
    boot = seed_bootstrap(by_cluster[:m], by_cluster[m:], num_permutations, seed)
    pvalues, floor, lows, highs = boot.pvalues, boot.floor, boot.ci_low, boot.ci_high
    method = (f"two-level bootstrap-t over {m} vs {len(dirs_b)} runs and {unit_text}, "
              f"{num_permutations} resamples, seed {seed}")
  at_floor = [floor > 0 and p <= floor * (1 + 1e-9) for p in pvalues]
  adjusted, bound = holm_with_bounds(pvalues, at_floor)
  return [Row(name, kind, float(a), float(b), c, float(p), float(h), floor, bool(hb), float(lo),
              float(hi), len(unit_names), method)
          for (name, kind, _), a, b, c, p, h, hb, lo, hi in
          zip(statistics, a_values, b_values, counts, pvalues, adjusted, bound, lows, highs)]


@dataclasses.dataclass(frozen=True)
class ContrastRow:
  """One statistic of a contrast of seed means, sum_j c_j mean(group j)."""
  name: str
  value: float
  group_means: tuple[float, ...]
  p_value: float
  p_floor: float
  ci_low: float
  ci_high: float
  num_clusters: int
  method: str


def contrast(dir_groups: Sequence[Sequence[str]], coefficients: Sequence[float],
             metric: str = "map", num_resamples: int = 10_000, seed: int = 0,
             cluster: str = "question", summary_only: bool = True,
             groups: Mapping[str, Sequence[str]] | None = None) -> list[ContrastRow]:
  """sum_j c_j (seed mean of group j) for the three summaries, each language group's three (as
  compare) and every setting unless summary_only, with contrast_bootstrap's 95% interval and p.
  Every directory is an evaluation of the same collection, part and languages; a group of runs
  is one strategy's seeds."""
  run_groups = [list(g) for g in dir_groups]
  if len(run_groups) != len(coefficients) or any(not g for g in run_groups):
    raise CompareError(f"{len(run_groups)} groups of runs for {len(coefficients)} coefficients; "
                       "give one non-empty group per coefficient")
  if num_resamples < 1:
    raise CompareError(f"num_resamples={num_resamples}; expected at least 1")
  flat = [d for g in run_groups for d in g]
  statistics, per_run, clusters, unit_names = _per_query_contributions(
      flat, metric, cluster, summary_only, groups)
  by_cluster = sum_by_cluster(per_run, clusters, len(unit_names))  # [R, K, C]
  bounds = np.cumsum([0] + [len(g) for g in run_groups])
  parts = [by_cluster[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
  boot = contrast_bootstrap(parts, coefficients, num_resamples, seed)
  means = [p.sum(-1).mean(0) for p in parts]  # [K] per group
  method = (f"two-level bootstrap-t of the contrast {tuple(coefficients)} over groups of "
            f"{[len(g) for g in run_groups]} runs and {len(unit_names)} {cluster} units, "
            f"{num_resamples} resamples, seed {seed}")
  return [ContrastRow(name, float(boot.diff[k]), tuple(float(m[k]) for m in means),
                      float(boot.pvalues[k]), boot.floor, float(boot.ci_low[k]),
                      float(boot.ci_high[k]), len(unit_names), method)
          for k, (name, _, _) in enumerate(statistics)]


def _per_query_contributions(dirs: Sequence[str], metric: str, cluster: str, summary_only: bool,
                             groups: Mapping[str, Sequence[str]] | None = None):
  """(statistics, per-run contributions [R, K, Q], query clusters [Q], cluster names)."""
  results, base, values = _load_runs(dirs, metric)
  columns = [str(c) for c in base["setting_columns"]]
  langs = columns[:-1]
  if values[0].ndim == 1:  # rank distance: pool only
    values = [np.concatenate([np.full((len(v), len(langs)), np.nan), v[:, None]], axis=1)
              for v in values]
  query_lang = np.array([str(x) for x in base["query_langs"]])
  # A query enters a setting where every run scored it (the same queries for all runs of one
  # collection: NaN marks a setting without a relevant candidate).
  scored = np.all([~np.isnan(v) for v in values], axis=0)
  values = [np.where(scored, v, 0.0).astype(np.float64) for v in values]
  statistics = _statistics(results["languages"], columns, query_lang, scored, summary_only,
                           groups)
  if not statistics:
    raise CompareError(f"no query of {dirs[0]} has a {metric} value in any setting (all NaN in "
                       "per_query.npz); compare evaluations that scored at least one query")
  clusters, unit_names = cluster_ids(base["query_uids"], query_lang, cluster)
  per_run = np.stack([_contributions(v, statistics) for v in values])  # [R, K, Q]
  return statistics, per_run, clusters, unit_names


def format_rows(rows: Sequence[Row], metric: str, label_a: str, label_b: str) -> str:
  """The table the compare command prints (p and p(Holm) with their floors as bounds)."""
  digits = 1 if metric == "rank_distance" else 4
  seed_aware = any(not math.isnan(r.ci_low) for r in rows)
  interval = f" {'95% interval':>21}" if seed_aware else ""
  lines = [f"{metric}: B - A, A = {label_a}, B = {label_b}",
           f"{'setting':<16} {'A':>9} {'B':>9} {'B-A':>9}{interval} {'p':>9} {'p(Holm)':>9} "
           f"{'queries':>8}"]
  for r in rows:
    star = "*" if r.p_value < 0.05 else " "
    holm_text = "" if math.isnan(r.p_holm) else format_p(
        r.p_holm, r.p_holm if r.holm_is_bound else 0.0)
    ci = (f" [{r.ci_low:+.{digits}f}, {r.ci_high:+.{digits}f}]".rjust(22) if seed_aware else "")
    lines.append(f"{r.name:<16} {r.a:>9.{digits}f} {r.b:>9.{digits}f} {r.diff:>+9.{digits}f}"
                 f"{ci} {format_p(r.p_value, r.p_floor):>8}{star} {holm_text:>9} "
                 f"{r.num_queries:>8}")
  return "\n".join(lines)
