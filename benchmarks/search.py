r"""Benchmark: exact top-k search, hybrid_jax.search.exact_topk vs faiss-cpu IndexFlatIP.

    python benchmarks/search.py                 # 10,000 queries x 1,000,000 x 384 float32, top 100
    python benchmarks/search.py --small         # 1,000 x 100,000: a smoke run of a few seconds
    python benchmarks/search.py --threads=1 --chunk_size=16384 --query_chunk_size=1024
    python benchmarks/search.py --num_docs=200000 --rounds=5   # interleaved rounds, median ratio

faiss `IndexFlatIP` is the exact maximum-inner-product index users pick (BLAS matrix products in
blocks plus a heap per query). Both sides search the same seeded random float32 vectors (standard
normal; ties have probability zero) in this process, on the same cores: `--threads` (default all
cores of this machine) pins the process to that many cores (`os.sched_setaffinity`, before jax
starts, so XLA's thread pool sees only them) and sets faiss's OpenMP threads to the same number.

Timed: ours = `search_with_ranks` (what `exact_topk` runs) over the whole corpus, after a warm-up
search of one query block over the whole corpus that compiles the same steps (printed
separately); the number of queries its pruned scan could not certify is printed (they are
searched again in full, inside the timed run);
faiss = `index.add` (a copy of the corpus into the index, printed separately) and
`index.search`. Results are checked to be the same:
identical index lists except where float rounding (XLA vs BLAS summation order) swaps documents
whose scores differ by less than 2e-4, which must then agree on the score to that tolerance
(float64 re-scoring of both lists); the float32 scores of both are compared with float64
re-scoring too. Peak memory: resident memory sampled every 20 ms during each
side's run, minus the resident memory before it (the corpus and queries are already loaded); ours
is bounded by the blocks (`search.topk.PrunedShape.working_set_bytes`, printed next to it), not by
the corpus.
"""

from __future__ import annotations

import argparse
import os
import threading
import time


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_queries", type=int, default=10_000)
  parser.add_argument("--num_docs", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=384)
  parser.add_argument("--k", type=int, default=100)
  parser.add_argument("--chunk_size", type=int, default=0,
                      help="corpus rows per step (0: search.topk.default_block_shape)")
  parser.add_argument("--query_chunk_size", type=int, default=0,
                      help="queries per step (0: search.topk.default_block_shape)")
  parser.add_argument("--threads", type=int, default=0, help="cores for both (0: all)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--small", action="store_true",
                      help="1,000 queries x 100,000 documents (smoke run)")
  parser.add_argument("--skip_faiss", action="store_true", help="time ours only")
  parser.add_argument("--prefilter", choices=("auto", "on", "off"), default="auto",
                      help="ours: bfloat16 scoring + float32 re-scoring (auto: where bfloat16 is "
                      "fast, search.topk.fast_bfloat16)")
  parser.add_argument("--rounds", type=int, default=1,
                      help="timed rounds, faiss and ours in turn (the ratio's median is printed)")
  args = parser.parse_args()
  if args.small:
    args.num_queries, args.num_docs = 1_000, 100_000
  return args


class PeakRss:
  """Peak resident memory of this process while the block runs, sampled in a thread."""

  def __init__(self, interval: float = 0.02):
    import psutil  # pylint: disable=g-import-not-at-top
    self.process, self.interval = psutil.Process(), interval
    self.peak = self.before = 0

  def __enter__(self):
    self.before = self.peak = self.process.memory_info().rss
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.process.memory_info().rss)
      time.sleep(self.interval)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.process.memory_info().rss)

  @property
  def increase_gib(self) -> float:
    return (self.peak - self.before) / 2**30


def check_same_results(queries, corpus, ours_idx, faiss_idx, tolerance=2e-4) -> dict:
  """Counts of rows whose index lists are identical, hold the same documents in another order,
  or differ in documents (and of those, where ours holds the exactly better ones); raises if two
  lists differ by more than the tolerance, i.e. one side missed a document of the exact top k.
  The tolerance is float32 rounding: faiss's scores are off by up to ~1.2e-4 here (its BLAS sums
  384 products in another order), so documents whose true scores differ by less than that may
  swap places."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  counts = {"identical": 0, "reordered": 0, "other_documents": 0, "ours_exactly_better": 0}
  differing = np.flatnonzero((ours_idx != faiss_idx).any(axis=1))
  counts["identical"] = len(queries) - len(differing)
  for row in differing:
    q = queries[row].astype(np.float64)
    ours = np.sort(corpus[ours_idx[row]].astype(np.float64) @ q)
    theirs = np.sort(corpus[faiss_idx[row]].astype(np.float64) @ q)
    gap = np.abs(ours - theirs).max()
    if gap > tolerance:
      raise AssertionError(f"query {row}: the two top-k lists differ by score {gap:.3g} > "
                           f"{tolerance}: not the same exact search")
    if set(ours_idx[row]) == set(faiss_idx[row]):
      counts["reordered"] += 1
    else:
      counts["other_documents"] += 1
      counts["ours_exactly_better"] += int(ours.sum() > theirs.sum())
  return counts


def main():
  args = parse_args()
  cores = sorted(os.sched_getaffinity(0))
  threads = args.threads or len(cores)
  os.sched_setaffinity(0, cores[:threads])  # before jax and faiss start their thread pools
  import faiss  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from hybrid_jax.search import topk  # pylint: disable=g-import-not-at-top

  faiss.omp_set_num_threads(threads)
  rng = np.random.default_rng(args.seed)
  print(f"{args.num_queries} queries x {args.num_docs} documents x {args.dim} float32, top "
        f"{args.k}; {threads} thread(s) on cores {cores[:threads]}; jax {jax.__version__} "
        f"({jax.devices()[0].platform}), faiss {faiss.__version__}", flush=True)
  corpus = rng.standard_normal((args.num_docs, args.dim), dtype=np.float32)
  queries = rng.standard_normal((args.num_queries, args.dim), dtype=np.float32)
  prefilter = {"auto": None, "on": True, "off": False}[args.prefilter]
  default_chunk, default_query_chunk = topk.default_block_shape(jax.devices()[0])
  chunks = dict(chunk_size=args.chunk_size or default_chunk,
                query_chunk_size=args.query_chunk_size or default_query_chunk, prefilter=prefilter)
  print(f"prefilter: {args.prefilter} (bfloat16 fast here: "
        f"{topk.fast_bfloat16(jax.devices()[0])})", flush=True)

  # Warm-up: one query block over the whole corpus compiles exactly the steps the timed search
  # uses (full chunks and the padded last one), so nothing compiles later.
  started = time.perf_counter()
  query_block, _ = topk.block_shapes(args.num_queries, args.num_docs, **{
      k: v for k, v in chunks.items() if k != "prefilter"})
  topk.exact_topk(queries[:query_block], corpus, args.k, **chunks)
  compile_s = time.perf_counter() - started
  with PeakRss() as ours_memory:
    started = time.perf_counter()
    result = topk.search_with_ranks(queries, corpus, args.k, **chunks)
    ours_s = time.perf_counter() - started
  ours_scores, ours_idx = result.scores, result.indices
  shape = topk.pruned_shape(args.num_queries, args.num_docs, args.k,
                            chunk_size=chunks["chunk_size"],
                            query_chunk_size=chunks["query_chunk_size"])
  bound = shape.working_set_bytes(args.dim, args.num_queries) / 2**30
  print(f"ours  exact_topk: {ours_s:8.2f} s  ({args.num_queries / ours_s:,.0f} queries/s; "
        f"warm-up {compile_s:.1f} s: compile + one query block), "
        f"{result.fallback_queries} queries not certified by the pruned scan (searched again), "
        f"peak memory +{ours_memory.increase_gib:.2f} GiB "
        f"(working set {bound:.2f} GiB; corpus {corpus.nbytes / 2**30:.2f} GiB)",
        flush=True)
  if args.skip_faiss:
    return

  with PeakRss() as faiss_memory:
    started = time.perf_counter()
    index = faiss.IndexFlatIP(args.dim)
    index.add(corpus)
    add_s = time.perf_counter() - started
    started = time.perf_counter()
    faiss_scores, faiss_idx = index.search(queries, args.k)
    faiss_s = time.perf_counter() - started
  print(f"faiss IndexFlatIP: {faiss_s:8.2f} s  ({args.num_queries / faiss_s:,.0f} queries/s; "
        f"index.add {add_s:.1f} s), peak memory +{faiss_memory.increase_gib:.2f} GiB (index "
        "holds a copy of the corpus)", flush=True)
  same = check_same_results(queries, corpus, ours_idx, faiss_idx.astype(np.int64))
  print(f"same results: {same['identical']} of {args.num_queries} index lists identical, "
        f"{same['reordered']} the same documents with near-tied neighbours swapped, "
        f"{same['other_documents']} a k-th document within 2e-4 in score (ours exactly better in "
        f"{same['ours_exactly_better']}); max |score difference| at equal indices "
        f"{np.abs(ours_scores - faiss_scores)[ours_idx == faiss_idx].max():.2g}")
  sample = np.random.default_rng(1).choice(args.num_queries, min(500, args.num_queries),
                                           replace=False)
  errors = []
  for scores, idx in ((ours_scores, ours_idx), (faiss_scores, faiss_idx)):
    exact = np.einsum("qd,qkd->qk", queries[sample].astype(np.float64),
                      corpus[idx[sample]].astype(np.float64))
    errors.append(np.abs(scores[sample] - exact).max())
  print(f"score error vs float64 re-scoring ({len(sample)} queries): ours {errors[0]:.2g}, "
        f"faiss {errors[1]:.2g}")
  print(f"ratio (faiss time / ours): {faiss_s / ours_s:.2f}x  "
        f"(with faiss's index.add: {(faiss_s + add_s) / ours_s:.2f}x)", flush=True)
  if args.rounds > 1:
    # More rounds, each side in turn, so that load from other processes hits both alike.
    ratios = [faiss_s / ours_s]
    for r in range(2, args.rounds + 1):
      started = time.perf_counter()
      index.search(queries, args.k)
      faiss_s = time.perf_counter() - started
      started = time.perf_counter()
      topk.exact_topk(queries, corpus, args.k, **chunks)
      ours_s = time.perf_counter() - started
      ratios.append(faiss_s / ours_s)
      print(f"round {r}: ours {ours_s:.2f} s, faiss {faiss_s:.2f} s, ratio {ratios[-1]:.2f}x",
            flush=True)
    print(f"median ratio over {args.rounds} interleaved rounds: {np.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
  main()
