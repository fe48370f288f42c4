"""Paired significance tests between two evaluations of the same collection.

The unit of randomisation is the query: under the null hypothesis the two systems are
exchangeable for every query, so swapping A and B for a query flips the sign of all its
differences at once (in every setting it belongs to). A statistic that is a weighted sum of
per-query differences, T = sum_q w_q d_q (a setting mean, or a macro average over settings,
which weights each query by 1 / (num_settings * queries_in_setting)), is tested two-sided with a
seeded Monte-Carlo paired permutation (sign-flip) test:
    p = (1 + #{|T*| >= |T|}) / (1 + num_permutations).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from hybrid_jax import errors
from hybrid_jax.eval import grid as grid_lib
from hybrid_jax.eval import report


class CompareError(errors.UserError):
  """The two result directories cannot be compared."""


def sign_flip_pvalues(contributions: np.ndarray, num_permutations: int = 10_000,
                      seed: int = 0) -> np.ndarray:
  """Two-sided p-values of T_k = sum_q contributions[k, q] under random per-query sign flips.

  Args:
    contributions: [K, Q] weighted per-query differences of K statistics over the same Q
      queries (0 where a query does not enter a statistic). The same sign draws are used for
      every statistic, as they are the same random swaps of the two systems.
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


def holm(pvalues: Sequence[float]) -> np.ndarray:
  """Holm-Bonferroni adjusted p-values (family-wise error over the given tests)."""
  p = np.asarray(pvalues, np.float64)
  order = np.argsort(p)
  adjusted = np.empty_like(p)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(p) - rank) * p[i]))
    adjusted[i] = running
  return adjusted


@dataclasses.dataclass(frozen=True)
class Row:
  name: str  # "monolingual", "en->de", "en->all", ...
  kind: str  # "summary" | "setting"
  a: float
  b: float
  num_queries: int
  p_value: float
  p_holm: float = math.nan

  @property
  def diff(self) -> float:
    return self.b - self.a


def _aligned(dir_a: str, dir_b: str, metric: str):
  results_a, results_b = report.read_results_json(dir_a), report.read_results_json(dir_b)
  if results_a["dataset"] != results_b["dataset"]:
    raise CompareError(f"{dir_a} evaluates {results_a['dataset']!r} but {dir_b} evaluates "
                       f"{results_b['dataset']!r}; compare runs on the same dataset.")
  pa, pb = report.read_per_query(dir_a), report.read_per_query(dir_b)
  if list(pa["setting_columns"]) != list(pb["setting_columns"]):
    raise CompareError(f"the runs cover different candidate languages: "
                       f"{list(pa['setting_columns'])} vs {list(pb['setting_columns'])}")
  if metric not in pa["metrics"]:
    raise CompareError(f"unknown metric {metric!r}; per_query.npz holds {sorted(pa['metrics'])}")
  uids_a, uids_b = list(pa["query_uids"]), list(pb["query_uids"])
  if uids_a != uids_b:
    row_b = {u: i for i, u in enumerate(uids_b)}
    common = [i for i, u in enumerate(uids_a) if u in row_b]
    if len(common) != len(uids_a) or len(common) != len(uids_b):
      raise CompareError(f"the runs scored different queries ({len(uids_a)} vs {len(uids_b)}, "
                         f"{len(common)} in common); evaluate both on the same languages.")
    take_b = np.array([row_b[uids_a[i]] for i in common])
    pb = {**pb, "query_langs": pb["query_langs"][take_b],
          "metrics": {k: v[take_b] for k, v in pb["metrics"].items()}}
  return results_a, pa, pb


def compare(dir_a: str, dir_b: str, metric: str = "map", num_permutations: int = 10_000,
            seed: int = 0) -> list[Row]:
  """Per-setting and summary differences B - A of `metric` with paired permutation p-values."""
  results, pa, pb = _aligned(dir_a, dir_b, metric)
  columns = [str(c) for c in pa["setting_columns"]]
  langs = columns[:-1]
  va, vb = pa["metrics"][metric], pb["metrics"][metric]  # [Q, S] or [Q] (rank distance)
  if va.ndim == 1:  # rank distance: pool only
    va, vb = (np.concatenate([np.full((len(va), len(langs)), np.nan), v[:, None]], axis=1)
              for v in (va, vb))
  query_lang = np.array([str(x) for x in pa["query_langs"]])
  both = ~np.isnan(va) & ~np.isnan(vb)
  diff = np.where(both, vb - va, 0.0)

  # Each statistic is a weighted sum over (query, column) cells: a setting weighs its queries
  # 1/n; a macro average weighs each member setting 1/num_members on top.
  settings = []  # (name, query language, column, row mask)
  for x in [lang for lang in results["languages"] if np.any(query_lang == lang)]:
    for j, y in enumerate(columns):
      rows = (query_lang == x) & both[:, j]
      if rows.any():
        settings.append((f"{x}->{y}", x, j, rows))
  groups = {
      "monolingual": [s for s in settings if columns[s[2]] == s[1]],
      "cross_lingual": [s for s in settings if columns[s[2]] not in (s[1], grid_lib.POOL)],
      "multilingual": [s for s in settings if columns[s[2]] == grid_lib.POOL],
  }
  statistics = [(g, "summary", [(m, 1.0 / len(members)) for m in members])
                for g, members in groups.items() if members]
  statistics += [(s[0], "setting", [(s, 1.0)]) for s in settings]

  def weighted(values: np.ndarray, parts) -> np.ndarray:  # [Q] per-query contributions
    out = np.zeros(len(values))
    for (_, _, j, rows), scale in parts:
      out += np.where(rows, values[:, j], 0.0) * (scale / rows.sum())
    return out

  va0, vb0 = np.where(both, va, 0.0), np.where(both, vb, 0.0)
  contributions = np.stack([weighted(diff, parts) for _, _, parts in statistics])  # [K, Q]
  pvalues = sign_flip_pvalues(contributions, num_permutations, seed)
  a_values = [float(weighted(va0, parts).sum()) for _, _, parts in statistics]
  b_values = [float(weighted(vb0, parts).sum()) for _, _, parts in statistics]
  counts = [int(sum(s[3].sum() for s, _ in parts)) for _, _, parts in statistics]
  all_names = [n for n, _, _ in statistics]
  all_kinds = [k for _, k, _ in statistics]
  setting_idx = [i for i, k in enumerate(all_kinds) if k == "setting"]
  adjusted = np.full(len(statistics), math.nan)
  if setting_idx:
    adjusted[setting_idx] = holm(pvalues[setting_idx])
  return [Row(n, k, a, b, c, float(p), float(h)) for n, k, a, b, c, p, h in
          zip(all_names, all_kinds, a_values, b_values, counts, pvalues, adjusted)]


def format_rows(rows: Sequence[Row], metric: str, label_a: str, label_b: str) -> str:
  digits = 1 if metric == "rank_distance" else 4
  lines = [f"{metric}: B - A, A = {label_a}, B = {label_b}",
           f"{'setting':<16} {'A':>9} {'B':>9} {'B-A':>9} {'p':>8} {'p(Holm)':>8} {'queries':>8}"]
  for r in rows:
    star = "*" if r.p_value < 0.05 else " "
    holm_text = "" if math.isnan(r.p_holm) else f"{r.p_holm:.4f}"
    lines.append(f"{r.name:<16} {r.a:>9.{digits}f} {r.b:>9.{digits}f} {r.diff:>+9.{digits}f} "
                 f"{r.p_value:>7.4f}{star} {holm_text:>8} {r.num_queries:>8}")
  return "\n".join(lines)
