r"""Compares two evaluation output directories per setting, with paired significance tests.

    python -m hybrid_jax.compare RUN_A RUN_B [--metric=map] [--permutations=10000] [--seed=0]

RUN_A and RUN_B are output directories of `python -m hybrid_jax.evaluate` on the same dataset
and languages (they hold results.json and per_query.npz). Prints, for the three summaries and
every setting, A, B, B - A and the two-sided p-value of a paired permutation (sign-flip) test
over queries (hybrid_jax/eval/significance.py), plus Holm-adjusted p-values over the settings.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags

from hybrid_jax import errors
from hybrid_jax.eval import significance

_METRIC = flags.DEFINE_enum(
    "metric", "map", ["map", "mrr", "recall@1", "recall@10", "recall@100", "ndcg@10",
                      "rank_distance", "recall@20"],
    "Per-query metric to compare (MKQA runs hold recall@20 and recall@100: answer recall).")
_PERMUTATIONS = flags.DEFINE_integer("permutations", 10_000, "Random sign flips per test.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the permutations (results are reproducible).")
_SUMMARY_ONLY = flags.DEFINE_bool("summary_only", False, "Print only the three summaries.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", "", "Also write the rows to this JSON file.")


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: python -m hybrid_jax.compare RUN_A RUN_B [--metric=map]")
  dir_a, dir_b = argv[1], argv[2]
  rows = errors.exit_on_user_error(lambda: significance.compare(
      dir_a, dir_b, _METRIC.value, _PERMUTATIONS.value, _SEED.value))
  if _SUMMARY_ONLY.value:
    rows = [r for r in rows if r.kind == "summary"]
  print(significance.format_rows(rows, _METRIC.value, dir_a, dir_b))
  print(f"p: two-sided paired permutation test over queries ({_PERMUTATIONS.value} sign flips, "
        f"seed {_SEED.value}); * p < 0.05; p(Holm) adjusts over the per-setting tests.")
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump([dict(r.__dict__, diff=r.diff) for r in rows], f, indent=1)


if __name__ == "__main__":
  app.run(main)
