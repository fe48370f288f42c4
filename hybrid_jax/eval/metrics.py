"""Ranking metrics of the retrieval grid, computed on device in query x candidate chunks.

One pass scores every query against every candidate of the pool and yields, for each query, its
metrics in every setting at once: against each candidate language alone (X->Y, including X->X) and
against the whole pool (X->all). Nothing of size [num_queries, num_candidates] is ever built: for a
chunk of B queries the candidates are scanned in chunks of C, and only the number of candidates
that outscore each relevant candidate is kept ([B, R, L] counters, R = most relevant candidates
of any query, L = number of candidate languages). From those ranks the metrics follow exactly:

  AP      = (1/n) * sum_j j / rank_j   over the relevant candidates sorted by rank (full ranking)
  RR      = 1 / rank of the best-ranked relevant candidate
  R@k     = |relevant with rank <= k| / n          (trec_eval's recall_k)
  nDCG@10 = sum_{rank<=10} gain / log2(rank + 1), divided by the ideal DCG of the query's gains
  rank distance (pool only) = rank of the lowest-ranked relevant - rank of the highest-ranked one

Ties (documented decision): a tie is broken AGAINST the relevant candidate, i.e. every candidate
with a score >= a relevant candidate's score is ranked above it, and relevant candidates tied with
each other are ordered by their position in the collection. This is the pessimistic convention:
a collapsed model (all embeddings equal) gets the worst possible scores, never perfect ones. With
tie-free scores it is the usual ranking and agrees with trec_eval. The score of a relevant
candidate is taken from its own embedding (a gather), the scores of the others from the chunk's
matrix product; the two agree to the last bit except for accumulation order, which can only
matter for scores within an ulp, i.e. ties.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

METRICS = ("map", "mrr", "recall@1", "recall@10", "recall@100", "ndcg@10")
RECALL_CUTOFFS = (1, 10, 100)
NDCG_CUTOFF = 10

# Elements of the [B, R, C] comparison tensor one scan step may hold (bounds device memory).
_COMPARE_BUDGET = 1 << 25


@dataclasses.dataclass(frozen=True)
class PerQueryMetrics:
  """Per-query metrics in every setting; NaN where the query has no relevant candidate there.

  Setting axis S = L + 1: index y < L is "candidate language y alone", index L is the pool.
  """
  values: dict[str, np.ndarray]  # metric name -> [Q, S] float32
  num_relevant: np.ndarray  # [Q, S] int32
  rank_distance: np.ndarray  # [Q] float32 (pool only; NaN without a relevant candidate)
  best_rank: np.ndarray  # [Q, S] int32 rank of the best relevant candidate (0 if none)


@dataclasses.dataclass(frozen=True)
class RelevanceArrays:
  """Relevance of a collection as padded per-query arrays (indices into the candidate list)."""
  cand_index: np.ndarray  # [Q, R] int32, -1 = padding
  gain: np.ndarray  # [Q, R] float32, 0 for padding (graded gain for nDCG; AP/recall use gain > 0)


def _pessimistic_ranks(q_emb, rel_emb, rel_valid, rel_lang, cand_chunks, cand_valid,
                       chunk_lang, chunk_start, rel_index, num_langs):
  """Ranks of each relevant candidate within its language and within the pool.

  Args:
    q_emb: [B, D] query embeddings.
    rel_emb: [B, R, D] embeddings of each query's relevant candidates.
    rel_valid: [B, R] bool, False on padding.
    rel_lang: [B, R] int32 language index of each relevant candidate.
    cand_chunks: [K, C, D] candidate embeddings, each chunk holding one language.
    cand_valid: [K, C] bool, False on padding rows.
    chunk_lang: [K] int32 language of each chunk.
    chunk_start: [K] int32 position of each chunk's first row in the flattened [K*C] layout.
    rel_index: [B, R] int32 flattened position of each relevant candidate (-1 on padding).
    num_langs: L.

  Returns:
    rank_lang: [B, R] int32 rank among the candidates of the relevant candidate's language.
    rank_pool: [B, R] int32 rank in the whole pool.
  """
  batch, _ = rel_valid.shape
  chunk_size = cand_chunks.shape[1]
  rel_score = jnp.einsum("bd,brd->br", q_emb, rel_emb)  # [B, R]
  rows = jnp.arange(batch)[:, None]

  def scan_chunk(counts, chunk):
    cands, valid, lang, start = chunk
    scores = q_emb @ cands.T  # [B, C]
    # Relevant candidates are counted among themselves below, with their gathered scores.
    local = rel_index - start
    local = jnp.where(rel_valid & (local >= 0) & (local < chunk_size), local, chunk_size)
    is_rel = jnp.zeros((batch, chunk_size), bool).at[rows, local].set(True, mode="drop")
    others = jnp.where(is_rel | ~valid[None, :], -jnp.inf, scores)  # [B, C]
    outscoring = jnp.sum(others[:, None, :] >= rel_score[:, :, None], axis=-1, dtype=jnp.int32)
    counts = counts + outscoring[:, :, None] * jax.nn.one_hot(lang, num_langs, dtype=jnp.int32)
    return counts, None

  counts0 = jnp.zeros(rel_valid.shape + (num_langs,), jnp.int32)  # [B, R, L]
  counts, _ = jax.lax.scan(scan_chunk, counts0, (cand_chunks, cand_valid, chunk_lang, chunk_start))

  # Relevant-vs-relevant order: higher score first, ties by collection position (r' < r first).
  r_ids = jnp.arange(rel_valid.shape[1])
  s_other, s_self = rel_score[:, None, :], rel_score[:, :, None]  # [B, 1, R'], [B, R, 1]
  ahead = (s_other > s_self) | ((s_other == s_self) & (r_ids[None, None, :] < r_ids[None, :, None]))
  ahead &= rel_valid[:, None, :]
  same_lang = rel_lang[:, None, :] == rel_lang[:, :, None]
  rel_ahead_pool = jnp.sum(ahead, axis=-1, dtype=jnp.int32)
  rel_ahead_lang = jnp.sum(ahead & same_lang, axis=-1, dtype=jnp.int32)
  own_lang_counts = jnp.take_along_axis(counts, jnp.clip(rel_lang, 0)[:, :, None], axis=-1)[..., 0]
  rank_lang = 1 + own_lang_counts + rel_ahead_lang
  rank_pool = 1 + jnp.sum(counts, axis=-1) + rel_ahead_pool
  return rank_lang, rank_pool


def metrics_from_ranks(ranks, mask, gain):
  """Metrics of one setting from the ranks of the relevant candidates.

  Args:
    ranks: [..., R] int32 ranks (distinct among the masked entries).
    mask: [..., R] bool, which entries are relevant in this setting.
    gain: [..., R] float32 relevance gains (for nDCG).

  Returns:
    dict of [...] float32 arrays (NaN where the mask is empty) and "num_relevant" [...] int32.
  """
  num_rel = jnp.sum(mask, axis=-1)
  denom = jnp.maximum(num_rel, 1).astype(jnp.float32)
  rank_f = ranks.astype(jnp.float32)
  # Position of each relevant candidate among the relevant ones (1 = best ranked).
  position = jnp.sum(mask[..., None, :] & (ranks[..., None, :] <= ranks[..., :, None]), axis=-1)
  out = {
      "map": jnp.sum(jnp.where(mask, position / rank_f, 0.0), axis=-1) / denom,
      "mrr": jnp.max(jnp.where(mask, 1.0 / rank_f, 0.0), axis=-1),
  }
  for k in RECALL_CUTOFFS:
    out[f"recall@{k}"] = jnp.sum(mask & (ranks <= k), axis=-1) / denom
  discount = 1.0 / jnp.log2(rank_f + 1.0)
  dcg = jnp.sum(jnp.where(mask & (ranks <= NDCG_CUTOFF), gain * discount, 0.0), axis=-1)
  ideal_gain = -jnp.sort(-jnp.where(mask, gain, 0.0), axis=-1)[..., :NDCG_CUTOFF]
  ideal_discount = 1.0 / jnp.log2(jnp.arange(ideal_gain.shape[-1], dtype=jnp.float32) + 2.0)
  idcg = jnp.sum(ideal_gain * ideal_discount, axis=-1)
  out["ndcg@10"] = dcg / jnp.where(idcg > 0, idcg, 1.0)
  empty = num_rel == 0
  out = {k: jnp.where(empty, jnp.nan, v.astype(jnp.float32)) for k, v in out.items()}
  out["num_relevant"] = num_rel.astype(jnp.int32)
  big = jnp.iinfo(jnp.int32).max
  best = jnp.min(jnp.where(mask, ranks, big), axis=-1)
  worst = jnp.max(jnp.where(mask, ranks, 0), axis=-1)
  out["best_rank"] = jnp.where(empty, 0, best)
  out["rank_distance"] = jnp.where(empty, jnp.nan, (worst - best).astype(jnp.float32))
  return out


def _chunk_metrics(q_emb, rel_emb, rel_valid, rel_lang, rel_gain, rel_index, cand_chunks,
                   cand_valid, chunk_lang, chunk_start, *, num_langs):
  """All settings' metrics for one chunk of queries: values [B, L+1] per metric."""
  rank_lang, rank_pool = _pessimistic_ranks(
      q_emb, rel_emb, rel_valid, rel_lang, cand_chunks, cand_valid, chunk_lang, chunk_start,
      rel_index, num_langs)
  langs = jnp.arange(num_langs)
  lang_mask = rel_valid[:, None, :] & (rel_lang[:, None, :] == langs[None, :, None])  # [B, L, R]
  mask = jnp.concatenate([lang_mask, rel_valid[:, None, :]], axis=1)  # [B, L+1, R]
  ranks = jnp.concatenate(
      [jnp.broadcast_to(rank_lang[:, None, :], lang_mask.shape), rank_pool[:, None, :]], axis=1)
  gain = jnp.broadcast_to(rel_gain[:, None, :], mask.shape)
  out = metrics_from_ranks(ranks, mask, gain)
  out["rank_distance"] = out["rank_distance"][:, -1]
  return out


class Progress:
  """Progress with rate and ETA on stderr, at most every `interval` seconds (also used by the
  corpus search, search/topk.py, with unit "documents")."""

  def __init__(self, total: int, desc: str, interval: float = 5.0, enabled: bool = True,
               unit: str = "queries"):
    self.total, self.desc, self.interval, self.enabled = total, desc, interval, enabled
    self.unit = unit
    self.start = self.last = time.time()
    self.done = 0

  def update(self, n: int) -> None:
    self.done += n
    now = time.time()
    if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
      self.last = now
      elapsed = now - self.start
      rate = self.done / max(elapsed, 1e-9)
      eta = (self.total - self.done) / max(rate, 1e-9)
      print(f"{self.desc}: {self.done}/{self.total} {self.unit}, {rate:.0f}/s, "
            f"elapsed {elapsed:.1f}s, ETA {eta:.1f}s", file=sys.stderr, flush=True)


def _choose_chunk_size(lang_sizes: Sequence[int], max_chunk: int) -> int:
  """Candidate chunk length: little padding (each chunk holds one language), few scan steps."""
  best, best_cost = 128, math.inf
  size = 128
  while size <= max(128, max_chunk):
    padded = sum(-(-n // size) * size for n in lang_sizes)
    cost = padded + 256 * sum(-(-n // size) for n in lang_sizes)  # rows + per-step overhead
    if cost < best_cost:
      best, best_cost = size, cost
    size *= 2
  return best


def default_mesh() -> Mesh:
  """All local devices on one "data" axis: query chunks are split over it, candidates replicated."""
  return Mesh(np.array(jax.local_devices()), ("data",))


def score_grid(query_emb: np.ndarray, candidate_emb: np.ndarray, candidate_lang: np.ndarray,
               num_langs: int, relevance: RelevanceArrays, *, mesh: Mesh | None = None,
               query_chunk: int = 0, candidate_chunk: int = 2048,
               show_progress: bool = True) -> PerQueryMetrics:
  """Every query's metrics against each candidate language and against the pool.

  Args:
    query_emb: [Q, D] float32 (scored by dot product; normalise first for cosine).
    candidate_emb: [N, D] float32.
    candidate_lang: [N] int32 language index in [0, num_langs).
    num_langs: L.
    relevance: per-query relevant candidate indices and gains ([Q, R]).
    mesh: devices to split query chunks over (default: all local devices).
    query_chunk: queries per step (0: as many as the memory budget allows, at most 1024).
    candidate_chunk: largest candidate chunk tried; the chunk length is chosen to limit padding.
    show_progress: progress and ETA on stderr.
  """
  query_emb = np.asarray(query_emb, np.float32)
  candidate_emb = np.asarray(candidate_emb, np.float32)
  candidate_lang = np.asarray(candidate_lang, np.int32)
  num_queries, dim = query_emb.shape
  num_rel_max = max(1, relevance.cand_index.shape[1])
  mesh = mesh or default_mesh()
  num_devices = mesh.devices.size

  # Candidates regrouped into chunks of one language each, padded: [K, C, D].
  lang_sizes = [int(np.sum(candidate_lang == y)) for y in range(num_langs)]
  chunk = _choose_chunk_size([n for n in lang_sizes if n], candidate_chunk)
  flat_pos = np.full(len(candidate_emb), -1, np.int64)  # candidate index -> flattened position
  chunk_lang, slots = [], 0
  for y in range(num_langs):
    members = np.flatnonzero(candidate_lang == y)
    num_chunks = -(-len(members) // chunk)
    flat_pos[members] = slots + np.arange(len(members))
    chunk_lang += [y] * num_chunks
    slots += num_chunks * chunk
  padded = np.zeros((slots, dim), np.float32)
  valid = np.zeros(slots, bool)
  padded[flat_pos] = candidate_emb
  valid[flat_pos] = True
  num_chunks = slots // chunk
  cand_chunks = padded.reshape(num_chunks, chunk, dim)
  cand_valid = valid.reshape(num_chunks, chunk)
  chunk_lang = np.asarray(chunk_lang, np.int32)
  chunk_start = (np.arange(num_chunks) * chunk).astype(np.int32)

  rel_valid_all = relevance.cand_index >= 0
  safe_index = np.where(rel_valid_all, relevance.cand_index, 0)
  rel_flat_all = np.where(rel_valid_all, flat_pos[safe_index], -1).astype(np.int32)
  rel_lang_all = np.where(rel_valid_all, candidate_lang[safe_index], -1).astype(np.int32)

  if not query_chunk:
    query_chunk = max(1, min(1024, _COMPARE_BUDGET // (num_rel_max * chunk)))
  query_chunk = max(num_devices, query_chunk // num_devices * num_devices)

  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P("data"))
  fn = jax.jit(functools.partial(_chunk_metrics, num_langs=num_langs),
               in_shardings=(split,) * 6 + (replicated,) * 4, out_shardings=split)
  cand_args = [jax.device_put(x, replicated)
               for x in (cand_chunks, cand_valid, chunk_lang, chunk_start)]

  outputs = []
  progress = Progress(num_queries, "scoring", enabled=show_progress)
  for begin in range(0, num_queries, query_chunk):
    end = min(begin + query_chunk, num_queries)
    pad = query_chunk - (end - begin)
    take = lambda x, fill: np.concatenate(  # noqa: E731
        [x[begin:end], np.full((pad,) + x.shape[1:], fill, x.dtype)]) if pad else x[begin:end]
    rel_valid = take(rel_valid_all, False)
    rel_flat = take(rel_flat_all, -1)
    rel_emb = padded[np.maximum(rel_flat, 0)]  # [B, R, D]
    args = (take(query_emb, 0.0), rel_emb, rel_valid, take(rel_lang_all, -1),
            take(relevance.gain.astype(np.float32), 0.0), rel_flat)
    # Explicit placement: with several processes jit refuses NumPy inputs for non-replicated
    # shardings, even when (as here) the mesh holds only this process's devices.
    out = fn(*jax.device_put(args, split), *cand_args)
    outputs.append(jax.tree.map(lambda x, n=end - begin: np.asarray(x)[:n], out))
    progress.update(end - begin)

  merged = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
  return PerQueryMetrics(
      values={m: merged[m] for m in METRICS}, num_relevant=merged["num_relevant"],
      rank_distance=merged["rank_distance"], best_rank=merged["best_rank"])
