r"""Benchmark: scoring the full LAReQA grid from cached embeddings, ours vs a per-query sklearn loop.

    python benchmarks/eval_grid.py [--dataset=xquad-r] [--embeddings=DIR] [--sklearn_fraction=0.1]

Ours: `GridEvaluator.score` (hybrid_jax/eval/metrics.py): one jit-compiled pass over query x
candidate chunks yields every query's metrics in all X->Y settings and the X->all pool at once,
plus the results dict. The peer is the straightforward evaluation LAReQA's reference code does:
for each query and each setting, `sklearn.metrics.average_precision_score(labels, scores)` over
that setting's candidates (scores from a NumPy matrix product).

Both run in this process on the same embeddings: those in --embeddings (the embeddings_io format,
e.g. written by `python -m hybrid_jax.evaluate --export_embeddings=DIR`), else seeded synthetic
ones (384-d, each query near a per-question "topic" shared with its relevant candidates, so mAP
is far from 0 and 1). The sklearn loop over the whole grid takes minutes here, so by default it
runs on a seeded random `--sklearn_fraction` of the queries, in EVERY setting (each query costs
the same: one AP per candidate language plus one for the pool), and its time is extrapolated
linearly to all queries; both the measured and the extrapolated figures are printed. Use
--sklearn_fraction=1 to time the whole loop. The script asserts that the two agree (<= 1e-6) on
every (query, setting) AP the loop computed, except where a relevant candidate's score is within
1e-6 of another candidate's (see `near_tied`: there float32 summation order or the tie convention
decides); those are counted and their largest difference printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
from sklearn.metrics import average_precision_score

from hybrid_jax.data import locations
from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import embeddings_io
from hybrid_jax.eval import evaluators


def synthetic_embeddings(collection: collection_lib.Collection, dim: int, seed: int):
  """Queries = topic(question id) + noise; relevant candidates = topic + noise; others random."""
  rng = np.random.default_rng(seed)
  qid = [u.rsplit("_", 1)[0] for u in collection.query_uids]
  topics = {i: rng.normal(size=dim) for i in sorted(set(qid))}
  queries = np.stack([topics[i] for i in qid]) + 1.5 * rng.normal(size=(len(qid), dim))
  candidates = 1.5 * rng.normal(size=(collection.num_candidates, dim))
  for i, rel in zip(qid, collection.relevant):
    for c, _ in rel:
      candidates[c] = topics[i] + 1.5 * rng.normal(size=dim)
  return queries.astype(np.float32), candidates.astype(np.float32)


def sklearn_grid_ap(collection: collection_lib.Collection, query_emb: np.ndarray,
                    candidate_emb: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """AP of the given queries in every setting (columns: candidate languages, then the pool).

  The reference loop: normalised embeddings, scores by matrix product, one sklearn call per
  (query, setting); NaN where the query has no relevant candidate in the setting.
  """
  q = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True)
  c = candidate_emb / np.linalg.norm(candidate_emb, axis=1, keepdims=True)
  cand_lang = np.array(collection.candidate_langs)
  members = [np.flatnonzero(cand_lang == y) for y in collection.languages]
  out = np.full((len(rows), len(collection.languages) + 1), np.nan)
  chunk = 256
  for start in range(0, len(rows), chunk):
    block = rows[start:start + chunk]
    scores = q[block] @ c.T  # [B, N]
    for b, i in enumerate(block):
      labels = np.zeros(collection.num_candidates, bool)
      labels[[cand for cand, _ in collection.relevant[i]]] = True
      for y, idx in enumerate(members):
        if labels[idx].any():
          out[start + b, y] = average_precision_score(labels[idx], scores[b, idx])
      out[start + b, -1] = average_precision_score(labels, scores[b])
  return out


def near_tied(collection: collection_lib.Collection, query_emb: np.ndarray,
              candidate_emb: np.ndarray, rows: np.ndarray, tolerance: float = 1e-6) -> np.ndarray:
  """[n, L + 1] bool: a relevant candidate's score is within `tolerance` of another candidate's.

  There the two implementations may rank differently without either being wrong: float32 dot
  products summed in another order differ by a few ulps (XLA vs NumPy), and exact ties (identical
  texts, e.g. two "I." sentences) are broken against the relevant candidate by us (pessimistic,
  hybrid_jax/eval/metrics.py) but grouped into one threshold by sklearn.
  """
  q = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True)
  c = candidate_emb / np.linalg.norm(candidate_emb, axis=1, keepdims=True)
  cand_lang = collection.lang_index(collection.candidate_langs)
  out = np.zeros((len(rows), len(collection.languages) + 1), bool)
  for b, i in enumerate(rows):
    scores = c @ q[i]  # [N]
    relevant = np.array([cand for cand, _ in collection.relevant[i]])
    others = np.ones(len(scores), bool)
    others[relevant] = False
    for r in relevant:
      close = others & (np.abs(scores - scores[r]) <= tolerance)
      if close.any():
        out[b, -1] = True
        out[b, cand_lang[r]] |= bool(np.any(close & (cand_lang == cand_lang[r])))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", default="xquad-r", choices=evaluators.LAREQA_DATASETS)
  parser.add_argument("--data_dir", default="", help="default: $HYBRID_JAX_DATA/<dataset>")
  parser.add_argument("--embeddings", default="", help="embeddings_io directory (default: "
                      "synthetic)")
  parser.add_argument("--dim", type=int, default=384, help="synthetic embedding width")
  parser.add_argument("--sklearn_fraction", type=float, default=0.1,
                      help="share of the queries the sklearn loop runs on (1 = all)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  data_dir = locations.dataset_dir(args.dataset, args.data_dir)
  collection = collection_lib.from_lareqa(data_dir, name=args.dataset)
  if args.embeddings:
    query_emb, cand_emb = embeddings_io.load_for(args.embeddings, collection.query_uids,
                                                 collection.candidate_uids)
    source = f"embeddings from {args.embeddings}"
  else:
    query_emb, cand_emb = synthetic_embeddings(collection, args.dim, args.seed)
    source = f"synthetic {args.dim}-d embeddings (seed {args.seed})"
  num_langs = len(collection.languages)
  print(f"{args.dataset}: {collection.num_queries} queries x {collection.num_candidates} "
        f"candidates, {num_langs} languages ({num_langs ** 2} X->Y settings + {num_langs} X->all); "
        f"{source}; {jax.device_count()} {jax.default_backend()} device(s), "
        f"{os.cpu_count()} CPU cores")

  # --- ours: the whole grid, first call (with compilation) and a second, warm call -------------
  evaluator = evaluators.GridEvaluator(collection, show_progress=False)
  start = time.perf_counter()
  per_query, results = evaluator.score(query_emb, cand_emb)
  ours_cold = time.perf_counter() - start
  start = time.perf_counter()
  evaluator.score(query_emb, cand_emb)
  ours_warm = time.perf_counter() - start
  assert len(results["settings"]) == num_langs ** 2

  # --- the sklearn loop, on a seeded sample of queries in every setting -------------------------
  rng = np.random.default_rng(args.seed)
  num_sampled = max(1, int(round(args.sklearn_fraction * collection.num_queries)))
  rows = np.sort(rng.choice(collection.num_queries, num_sampled, replace=False))
  start = time.perf_counter()
  reference = sklearn_grid_ap(collection, query_emb, cand_emb, rows)
  sklearn_measured = time.perf_counter() - start
  sklearn_full = sklearn_measured * collection.num_queries / num_sampled
  calls = int(np.sum(~np.isnan(reference)))

  # --- same numbers -------------------------------------------------------------------------------
  ours = per_query.values["map"][rows].astype(np.float64)  # [n, L + 1]
  assert np.array_equal(np.isnan(ours), np.isnan(reference)), "skipped settings differ"
  diff = np.abs(np.nan_to_num(ours) - np.nan_to_num(reference))
  tied = near_tied(collection, query_emb, cand_emb, rows) & ~np.isnan(reference)
  worst = float(np.max(diff[~tied], initial=0.0))
  setting_means = np.nanmean(ours, axis=0) - np.nanmean(reference, axis=0)
  print(f"agreement: {calls} (query, setting) APs compared; {calls - int(tied.sum())} without a "
        f"near-tie (a relevant candidate within 1e-6 of another's score): max |ours - sklearn| = "
        f"{worst:.2e}; {int(tied.sum())} with one: max {np.max(diff[tied], initial=0.0):.2e}; "
        f"max setting-mean difference {np.max(np.abs(setting_means)):.2e}")
  print(f"mAP (ours, full grid): monolingual {results['summary']['monolingual']['map']:.4f}, "
        f"cross-lingual {results['summary']['cross_lingual']['map']:.4f}, multilingual "
        f"{results['summary']['multilingual']['map']:.4f}")
  assert worst <= 1e-6, f"ours and sklearn disagree by {worst} on a tie-free (query, setting)"

  extrapolated = "measured" if num_sampled == collection.num_queries else "extrapolated"
  print(f"sklearn loop: {sklearn_measured:.1f}s measured on {num_sampled} of "
        f"{collection.num_queries} queries ({calls} AP calls); {extrapolated} full grid "
        f"{sklearn_full:.1f}s")
  print(f"ours: {ours_cold:.2f}s first call (compilation included), {ours_warm:.2f}s warm, "
        f"full grid (all metrics, all settings)")
  print(f"speed-up: {sklearn_full / ours_cold:.1f}x (first call), {sklearn_full / ours_warm:.1f}x "
        f"(warm)   [goal >= 20x]")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
