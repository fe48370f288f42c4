r"""Compares evaluation output directories per setting, with significance tests.

    python -m hybrid_jax.compare RUN_A RUN_B [--metric=map] [--cluster=question|query]
    python -m hybrid_jax.compare A_seed0,A_seed1,A_seed2 B_seed0,B_seed1,B_seed2
    python -m hybrid_jax.compare --contrast=1,-1,-1,1 S_home S_away T_home T_away

Each RUN is an output directory of `python -m hybrid_jax.evaluate` on the same dataset, part and
languages (it holds results.json and per_query.npz). Prints, for the three summaries and every
setting, A, B, B - A, the two-sided p-value and the Holm-adjusted p-value over the rows printed
(the family the report shows). A p-value at its Monte-Carlo floor is printed as a bound, e.g.
"<=0.0001" for 10,000 draws. The tests (hybrid_jax/eval/significance.py) answer different
questions:

- One run per side: "is checkpoint B better than checkpoint A on these questions?" A paired
  sign-flip test. `--cluster=question` (default) flips all query languages of a question id
  together (LAReQA grids, their held-out parts, MKQA example ids): translations share their gold
  sentences and move together. `--cluster=query` flips each query alone, which treats
  translations as independent and over-rejects on LAReQA; it is kept for comparison.
- Comma-separated runs per side (one evaluation directory per training seed): "is strategy B
  better than strategy A, over training seeds and questions?" The difference of the seed means
  with a 95% interval and p from a two-level bootstrap-t that resamples seeds (within each side)
  and question clusters, so training noise is inside the interval. A side of one run is treated
  as a fixed model without training noise (e.g. the zero-shot model).
- `--contrast=c1,c2,...` with one group of runs (comma-separated seeds) per coefficient: "is
  this contrast of seed means different from 0?", e.g. 1,-1,-1,1 over S in-domain, S shifted,
  T in-domain, T shifted (all scored on one pool): is strategy S's shift penalty different from
  T's? The same two-level bootstrap-t, every group's seeds resampled on their own.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags

from hybrid_jax import errors
from hybrid_jax.eval import runner
from hybrid_jax.eval import significance

_METRIC = flags.DEFINE_enum(
    "metric", "map", ["map", "mrr", "recall@1", "recall@10", "recall@100", "ndcg@10",
                      "rank_distance", "recall@20"],
    "Per-query metric to compare (MKQA runs hold recall@20 and recall@100: answer recall).")
_PERMUTATIONS = flags.DEFINE_integer(
    "permutations", 10_000, "Random sign flips per test (one run per side; all patterns are "
    "enumerated when there are fewer), or bootstrap resamples (several runs per side).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the permutations (results are reproducible).")
_CLUSTER = flags.DEFINE_enum(
    "cluster", "question", list(significance.CLUSTER_UNITS),
    "Unit of randomisation: question (all languages of a question id together; the default) or "
    "query (each query alone, which ignores that translations move together).")
_SUMMARY_ONLY = flags.DEFINE_bool(
    "summary_only", False, "Print (and Holm-adjust over) only the three summaries.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", "", "Also write the rows to this JSON file.")
_GROUPS = flags.DEFINE_string(
    "groups", "", "Language groups to compare too, as evaluate's --groups: "
    "NAME=lang+lang;NAME2=... (e.g. unseen=el+ru+th+tr): rows <group>/monolingual, ...")
_CONTRAST = flags.DEFINE_list(
    "contrast", [], "Coefficients c1,c2,... of a contrast of seed means, one per group of runs "
    "given as arguments (e.g. 1,-1,-1,1 for a difference of differences).")


def _runs(arg: str) -> list[str]:
  return [d for d in (part.strip() for part in arg.split(",")) if d]


def _contrast_main(groups: list[list[str]], languages: dict) -> None:
  try:
    coefficients = [float(c) for c in _CONTRAST.value]
  except ValueError:
    raise app.UsageError(f"--contrast={','.join(_CONTRAST.value)}: expected numbers, e.g. "
                         "--contrast=1,-1,-1,1") from None
  if len(groups) != len(coefficients):
    raise app.UsageError(f"--contrast has {len(coefficients)} coefficients but {len(groups)} "
                         "groups of runs were given; give one group (comma-separated seed "
                         "directories) per coefficient")
  rows = errors.exit_on_user_error(lambda: significance.contrast(
      groups, coefficients, _METRIC.value, _PERMUTATIONS.value, _SEED.value, _CLUSTER.value,
      summary_only=_SUMMARY_ONLY.value, groups=languages))
  at_floor = [r.p_floor > 0 and r.p_value <= r.p_floor * (1 + 1e-9) for r in rows]
  holm, bound = significance.holm_with_bounds([r.p_value for r in rows], at_floor)
  digits = 1 if _METRIC.value == "rank_distance" else 4
  print(f"{_METRIC.value}: contrast {' '.join(f'{c:+g}' for c in coefficients)} of the groups' "
        "seed means")
  print(f"{'setting':<16} {'contrast':>9} {'95% interval':>21} {'p':>9} {'p(Holm)':>9}")
  for r, h, b in zip(rows, holm, bound):
    interval = f"[{r.ci_low:+.{digits}f}, {r.ci_high:+.{digits}f}]"
    print(f"{r.name:<16} {r.value:>+9.{digits}f} {interval:>21} "
          f"{significance.format_p(r.p_value, r.p_floor):>9} "
          f"{significance.format_p(h, h if b else 0.0):>9}")
  print(f"p: {rows[0].method}; two-sided; p(Holm) adjusts over the {len(rows)} tests shown.")
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump([r.__dict__ for r in rows], f, indent=1)


def main(argv):
  languages = errors.exit_on_user_error(lambda: runner.parse_groups(_GROUPS.value))
  if _CONTRAST.value:
    _contrast_main([_runs(arg) for arg in argv[1:]], languages)
    return
  if len(argv) != 3:
    raise app.UsageError("usage: python -m hybrid_jax.compare RUN_A RUN_B [--metric=map], or "
                         "A_seed0,A_seed1,... B_seed0,B_seed1,... (one directory per seed)")
  dirs_a, dirs_b = _runs(argv[1]), _runs(argv[2])
  rows = errors.exit_on_user_error(lambda: significance.compare(
      dirs_a, dirs_b, _METRIC.value, _PERMUTATIONS.value, _SEED.value, _CLUSTER.value,
      summary_only=_SUMMARY_ONLY.value, groups=languages))
  print(significance.format_rows(rows, _METRIC.value, ",".join(dirs_a), ",".join(dirs_b)))
  seed_aware = len(dirs_a) > 1 or len(dirs_b) > 1
  question = ("is strategy B better than A, over training seeds and questions? A and B are seed "
              "means; the interval is the 95% two-level bootstrap-t interval of B - A."
              if seed_aware else "is checkpoint B better than checkpoint A on these questions?")
  fixed = [side for side, dirs in (("A", dirs_a), ("B", dirs_b)) if seed_aware and len(dirs) == 1]
  print(f"p: {rows[0].method}; two-sided; * p < 0.05; p(Holm) adjusts over the {len(rows)} "
        f"tests shown. Question answered: {question}"
        + (f" {' and '.join(fixed)}: one run, taken as a fixed model without training noise."
           if fixed else ""))
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump([dict(r.__dict__, diff=r.diff) for r in rows], f, indent=1)


if __name__ == "__main__":
  app.run(main)
