"""Exact maximum-inner-product top-k of queries over a corpus of embeddings, in JAX.

Why not one `queries @ corpus.T` and `lax.top_k`: at corpus scale (millions of passages) the
[Q, N] score matrix does not fit anywhere. Instead the corpus is streamed in chunks of
`chunk_size` rows (from NumPy, possibly a memory map, so the corpus never has to sit on the
device at once), each chunk is scored against `query_chunk_size` queries at a time, and a running
top-k per query is merged with the chunk's own top-k. Device memory is bounded by one chunk of
the corpus and one [query chunk, corpus chunk] score block, independent of N.

With a `jax.sharding.Mesh`, each corpus chunk is split over every device of the mesh (rows over
all mesh axes): each device scores its rows, takes its own top-k, and the per-device lists are
all-gathered and merged (`jax.shard_map`), so only k candidates per device cross the interconnect.

Exact and deterministic: the result equals a stable sort by (-score, corpus index), i.e. ties are
broken by the lower corpus index, under any chunking and any number of devices. `lax.top_k` picks
lower indices first among equal values within one array (documented), and the merges sort on the
explicit key (-score, index) with `lax.sort(num_keys=2)`, so the order never depends on where in
a concatenation a candidate came from. Scores are canonicalised so that -0.0 and +0.0 tie (XLA's
CPU top-k orders -0.0 below +0.0; NumPy and the reference compare them equal).

Certified pruning (the default scan). Selecting the exact top k of every chunk costs more than
its matrix product on CPU (lax.top_k is a partial sort per row). So each scored block only
contributes its best `groups` groups of 16 consecutive scores (by group maximum) to a running
list of `keep` = 2k candidates per query, and the scan tracks, per query, a bound on the score of
every document it dropped: the best unselected group maximum of any block and the best candidate
evicted from the list. On CPU the blocks are small enough for their scores to stay in cache
(`score_block_rows`) and the list absorbs many blocks' candidates at once (`merge_rows`): there a
top-k costs about the same for 500 as for 4,000 candidates, so merging rarely is cheap. At the
end a query is certified when that bound is strictly below its k-th best score (then no dropped
document can enter its top k, ties included); the few queries that are not are searched again
with the full selection above (`SearchResult.fallback_queries`).

bfloat16 prefilter (`prefilter`, default: where bfloat16 products are fast: TPU, GPU, CPUs with
AMX or AVX512-BF16): float32 embeddings are scored in that scan with bfloat16 inputs (float32
accumulation), 4-5x faster on such CPUs; the candidates are then re-scored in float32
(NumPy, on the host) and the certificate accounts for the bfloat16 error with a rigorous
per-query bound (Cauchy-Schwarz on the rounding residuals, plus float32 summation error), so the
result is still the exact float32 top k: a dropped document's float32 score is at most its
bfloat16 score plus the bound, which is below the k-th re-scored score.

bfloat16: with `dtype=jnp.bfloat16` queries and corpus are rounded to bfloat16 on the way to the
device (half the transfer and memory) and dot products accumulate in float32
(`preferred_element_type`). Float32 products use `Precision.HIGHEST` (TPUs and GPUs would
otherwise round float32 inputs to bfloat16 / TF32).

`search_with_ranks` also returns, in the same single pass over the corpus, the full-corpus rank of
given target documents (e.g. each query's relevant passages): the number of documents ranked
above each target under the same (-score, index) order, plus one. Ranking metrics such as MAP
over the whole corpus then need no [Q, N] matrix either.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hybrid_jax import errors
from hybrid_jax.eval import metrics as metrics_lib

# Elements of one [query chunk, local corpus rows] comparison block in the rank counting; the
# targets are processed in groups so that the group's block stays within this many elements.
_RANK_COUNT_BUDGET = 1 << 27
# Elements of the target embeddings gathered at once ([query rows, R, D]) to score the targets.
_TARGET_GATHER_BUDGET = 1 << 25
# Two-stage selection of a chunk's top k (`_chunk_topk`): scores per group, and how many times
# more scores than candidates (k * group) a row needs before it pays (measured on CPU: a
# 2.5x faster top 100 of 65536 scores; no gain for a top 1000 or rows of 33k scores).
_TOPK_GROUP = 16
_TOPK_MIN_RATIO = 32
# Groups each scored block of the pruned scan contributes per device, at least.
_MIN_GROUPS = 8
# Elements of the pruned scan's [query chunk, rows per device] score block on CPU
# (`score_block_rows`).
_CPU_SCORE_BLOCK = 1024 * 4096
# Corpus rows per merge into the running list of the pruned scan on CPU (`merge_rows`).
_CPU_MERGE_ROWS = 131072
# Float32 unit roundoff: the summation error of a D-term float32 dot product is at most
# gamma_D * sum |x_i y_i| with gamma_D = D u / (1 - D u) (Higham, Accuracy and Stability, 3.1).
_F32_UNIT_ROUNDOFF = 2.0**-24
_HIGHEST = lax.Precision.HIGHEST


class SearchInputError(errors.UserError):
  """Queries, corpus, k or mask do not fit together."""


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Top-k per query, best first, and optionally the full-corpus ranks of target documents."""
  scores: np.ndarray  # [Q, k] float32
  indices: np.ndarray  # [Q, k] int64 corpus row indices
  target_ranks: np.ndarray | None  # [Q, R] int64, 1 = best; 0 where the target is padding (-1)
  fallback_queries: int = 0  # queries the pruned scan could not certify, searched again in full


def exact_topk(queries, corpus, k: int, *, chunk_size: int | None = None,
               query_chunk_size: int | None = None, mesh: Mesh | None = None, dtype=jnp.float32,
               corpus_mask=None, prefilter: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact maximum-inner-product top-k.

  Args:
    queries: [Q, D] numpy or jax array.
    corpus: [N, D] numpy (memory maps welcome) or jax array.
    k: results per query, 1 <= k <= number of allowed documents.
    chunk_size: corpus rows scored per step (rounded up to a multiple of the mesh's devices);
      None = `default_block_shape` of the mesh's devices.
    query_chunk_size: queries scored per step; None = `default_block_shape`.
    mesh: devices to shard each corpus chunk over (all mesh axes); None = the first device.
    dtype: jnp.float32 or jnp.bfloat16 for the embeddings; scores accumulate in float32.
    corpus_mask: optional [N] bool, False = the document is never returned.
    prefilter: score float32 embeddings in bfloat16 first, then re-score the candidates in
      float32 (exact, see the module docstring); None = where bfloat16 is fast.

  Returns:
    (scores [Q, k] float32, indices [Q, k] int64), best first; ties by lower corpus index.
  """
  result = search_with_ranks(queries, corpus, k, chunk_size=chunk_size,
                             query_chunk_size=query_chunk_size, mesh=mesh, dtype=dtype,
                             corpus_mask=corpus_mask, prefilter=prefilter)
  return result.scores, result.indices


def search_with_ranks(queries, corpus, k: int, *, targets=None, chunk_size: int | None = None,
                      query_chunk_size: int | None = None, mesh: Mesh | None = None, dtype=jnp.float32,
                      corpus_mask=None, progress_desc: str | None = None,
                      prefilter: bool | None = None) -> SearchResult:
  """`exact_topk`, plus the full-corpus rank of each query's target documents.

  Args:
    targets: optional [Q, R] int corpus indices (-1 = padding). A target's rank is 1 + the number
      of allowed documents with a higher score, or an equal score and a lower index; a target
      that is itself masked out is ranked as if it were allowed. Within the top k the rank is the
      target's position in the returned list.
    progress_desc: when given, progress and ETA over the corpus are printed to stderr.
    Other arguments as in `exact_topk`.
  """
  queries_np, corpus_np = _as_host_or_device(queries), _as_host_or_device(corpus)
  num_queries, num_docs, dim = _check_shapes(queries_np, corpus_np, k)
  mask = None
  if corpus_mask is not None:
    mask = np.asarray(corpus_mask)
    if mask.shape != (num_docs,) or mask.dtype != np.bool_:
      raise SearchInputError(
          f"corpus_mask must be a bool array of shape [{num_docs}] (one flag per corpus row), "
          f"found {mask.dtype} {mask.shape}; pass e.g. np.ones({num_docs}, bool)")
    allowed = int(mask.sum())
    if k > allowed:
      raise SearchInputError(
          f"k={k} exceeds the {allowed} documents that corpus_mask allows; lower k or allow more "
          "documents")
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise SearchInputError(f"dtype must be float32 or bfloat16, found {dtype}")
  target_np = None
  if targets is not None:
    target_np = np.asarray(targets, np.int64)
    if target_np.ndim != 2 or target_np.shape[0] != num_queries:
      raise SearchInputError(
          f"targets must be [num_queries={num_queries}, R] corpus indices (-1 = padding), "
          f"found shape {target_np.shape}")
    if target_np.size and (target_np.max() >= num_docs or target_np.min() < -1):
      raise SearchInputError(
          f"targets must be corpus indices in [0, {num_docs}) or -1 for padding, found values "
          f"in [{target_np.min()}, {target_np.max()}]")
    if target_np.shape[1] == 0:
      target_np = None

  mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()[:1]), ("corpus",))
  default_chunk, default_query_chunk = default_block_shape(mesh.devices.flat[0])
  chunk_size = default_chunk if chunk_size is None else chunk_size
  query_chunk_size = default_query_chunk if query_chunk_size is None else query_chunk_size
  scan = functools.partial(_scan, corpus=corpus_np, mask=mask, chunk_size=chunk_size,
                           query_chunk_size=query_chunk_size, mesh=mesh, dtype=dtype)
  if prefilter is None:
    prefilter = fast_bfloat16(mesh.devices.flat[0])
  prefilter = bool(prefilter) and dtype == jnp.dtype(jnp.float32)
  scores, indices, uncertified = _pruned_scan(
      queries_np, corpus=corpus_np, k=k, mask=mask, chunk_size=chunk_size,
      query_chunk_size=query_chunk_size, mesh=mesh, dtype=dtype, prefilter=prefilter,
      progress_desc=progress_desc)
  if len(uncertified):
    exact_scores, exact_indices, _ = scan(
        _take_rows(queries_np, uncertified), k=k, targets=None,
        progress_desc=progress_desc and f"{progress_desc} ({len(uncertified)} uncertified)")
    scores[uncertified], indices[uncertified] = exact_scores, exact_indices
  target_ranks = None
  if target_np is not None:
    # Ranks inside the top k are positions in the list. Only the targets it lacks are counted,
    # in a second scan over the queries that have such targets: counting costs one pass over
    # the score block per target, the top k none, and most relevant documents of a usable
    # model are in its top k.
    position = _positions_in_list(target_np, indices)  # [Q, R], 0 = not in the list
    deep = (target_np >= 0) & (position == 0)
    target_ranks = np.where(target_np >= 0, position, 0).astype(np.int64)
    rows = np.flatnonzero(deep.any(axis=1))
    if len(rows):
      width = int(deep.sum(axis=1).max())
      compact = np.full((len(rows), width), -1, np.int64)
      for i, row in enumerate(rows):
        row_targets = target_np[row][deep[row]]
        compact[i, :len(row_targets)] = row_targets
      _, _, counts = scan(_take_rows(queries_np, rows), k=1, targets=compact,
                          progress_desc=progress_desc and f"{progress_desc} (ranks)")
      # A target the list lacks ranks below it; the counted rank can say otherwise only by
      # float rounding between the gathered and the chunk's dot products (near-ties).
      ranks = np.maximum(counts.astype(np.int64) + 1, k + 1)
      for i, row in enumerate(rows):
        target_ranks[row, deep[row]] = ranks[i, :int(deep[row].sum())]
  return SearchResult(scores=scores.astype(np.float32), indices=indices.astype(np.int64),
                      target_ranks=target_ranks, fallback_queries=len(uncertified))


def default_block_shape(device) -> tuple[int, int]:
  """(chunk_size, query_chunk_size) per step for a search on `device`'s platform.

  On CPU the [query chunk, corpus chunk] float32 score block is written by the matrix product and
  read back by the selection, so it pays to keep it in cache: 1,024 x 32,768 (128 MiB) searched
  10k x 1M x 384 in 26.5 - 28.5 s against 29.1 - 30.9 s for 4,096 x 65,536 (833 MiB, more than
  the development machine's 480 MiB L3), 10k x 250k in 9.3 s against 11.6 s, with a sixth of the
  peak memory (benchmarks/README.md). Accelerators keep their scores in HBM either way and prefer
  fewer, larger steps. These are the blocks of the exhaustive scan (uncertified queries, target
  ranks); on CPU the pruned scan scores smaller blocks (`score_block_rows`) and merges larger
  spans (`merge_rows`)."""
  if device.platform == "cpu":
    return 32768, 1024
  return 65536, 4096


def block_shapes(num_queries: int, num_docs: int, *, chunk_size: int = 65536,
                 query_chunk_size: int = 4096, num_devices: int = 1) -> tuple[int, int]:
  """(queries per block, corpus rows per chunk) that a search of this size compiles for.

  Equal chunks of at most chunk_size rows (rounded up to whole groups of the top-k selection on
  every device), so that the last one is not mostly padding: 100k documents in chunks of 65536
  would score 131k rows, in two chunks of 50k they score 100k. Queries likewise."""
  num_chunks = -(-num_docs // max(1, chunk_size))
  chunk = _round_up(-(-num_docs // num_chunks), num_devices * _TOPK_GROUP)
  if chunk > max(chunk_size, num_devices):  # a small chunk_size: whole devices, not groups
    chunk = _round_up(-(-num_docs // num_chunks), num_devices)
  query_chunk = -(-num_queries // -(-num_queries // max(1, query_chunk_size)))
  return query_chunk, chunk


def _scan(queries_np, *, corpus, k: int, targets, mask, chunk_size: int, query_chunk_size: int,
          mesh: Mesh, dtype, progress_desc: str | None):
  """One pass over the corpus: (scores [Q, k], indices [Q, k], counts [Q, R] or None), where
  counts[q, r] is the number of allowed documents ranked above targets[q, r]."""
  num_queries, num_docs = queries_np.shape[0], corpus.shape[0]
  num_devices = mesh.devices.size
  query_chunk, chunk = block_shapes(num_queries, num_docs, chunk_size=chunk_size,
                                    query_chunk_size=query_chunk_size, num_devices=num_devices)
  num_targets = 0 if targets is None else targets.shape[1]
  local_rows = chunk // num_devices
  target_group = max(1, min(num_targets or 1, _RANK_COUNT_BUDGET // (query_chunk * local_rows)))
  steps = {masked: _merge_step(mesh, k=k, local_k=min(k, local_rows), num_targets=num_targets,
                               target_group=target_group, masked=masked)
           for masked in (False, True)}

  replicated = NamedSharding(mesh, P())
  rows_sharded = NamedSharding(mesh, P(mesh.axis_names))
  query_starts = list(range(0, num_queries, query_chunk))
  query_blocks = [jax.device_put(_padded_rows(queries_np, s, query_chunk, dtype), replicated)
                  for s in query_starts]
  target_blocks = [None] * len(query_starts)
  if targets is not None:
    target_blocks = [_target_block(targets, queries_np, corpus, s, query_chunk, dtype,
                                   replicated) for s in query_starts]
  state = [_initial_state(query_chunk, k, num_targets, replicated) for _ in query_starts]

  for start, chunk_emb, chunk_valid, masked in _placed_chunks(
      corpus, mask, chunk, rows_sharded, dtype, progress_desc, lambda: state[0]):
    step = steps[masked]
    for i, queries_block in enumerate(query_blocks):
      state[i] = step(state[i], queries_block, target_blocks[i], chunk_emb, chunk_valid,
                      jnp.int32(start))

  scores = np.concatenate([np.asarray(s["scores"]) for s in state])[:num_queries]
  indices = np.concatenate([np.asarray(s["indices"]) for s in state])[:num_queries]
  counts = None
  if targets is not None:
    counts = np.concatenate([np.asarray(s["counts"]) for s in state])[:num_queries]
  return scores, indices, counts


def _placed_chunks(corpus, mask, chunk: int, sharding, dtype, progress_desc, in_flight):
  """Yields (start, chunk rows on the devices, their validity, whether any row is invalid) for
  each corpus chunk. Before placing a chunk after the first it waits on `in_flight()` (the
  previous chunk's first state): asynchronous dispatch would otherwise let the host place chunk
  after chunk while earlier ones are still being scored, and memory would grow with the corpus.
  Steps run in dispatch order, so once that state is ready every step of the chunk before it is
  done and its buffers can go."""
  num_docs = corpus.shape[0]
  progress = metrics_lib.Progress(num_docs, progress_desc or "", interval=10.0,
                                 enabled=bool(progress_desc), unit="documents")
  for start in range(0, num_docs, chunk):
    if start:
      jax.block_until_ready(in_flight())
    rows = min(chunk, num_docs - start)
    valid = np.zeros(chunk, bool)
    valid[:rows] = True if mask is None else mask[start:start + rows]
    yield (start, jax.device_put(_padded_rows(corpus, start, chunk, dtype), sharding),
           jax.device_put(valid, sharding), mask is not None or rows < chunk)
    progress.update(rows)


# --- the pruned scan ---------------------------------------------------------------------------
def fast_bfloat16(device) -> bool:
  """Whether bfloat16 matrix products (float32 accumulation) are much faster than float32 ones
  on `device`: TPUs and GPUs, and CPUs with AMX-BF16 or AVX512-BF16 (XLA's CPU backend uses
  them; measured on a Sapphire Rapids core: 1,100 vs 240 GFLOP/s)."""
  if device.platform != "cpu":
    return device.platform in ("tpu", "gpu", "cuda", "rocm")
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("flags"):
          flags = set(line.split(":", 1)[1].split())
          return bool(flags & {"amx_bf16", "avx512_bf16"})
  except OSError:
    pass
  return False


def _pruned_scan(queries_np, *, corpus, k: int, mask, chunk_size: int, query_chunk_size: int,
                 mesh: Mesh, dtype, prefilter: bool, progress_desc: str | None):
  """(scores [Q, k], indices [Q, k], uncertified query rows): one pass with certified pruning
  (module docstring); rows of `uncertified` must be searched again with `_scan`.

  Each step places and scores one block of `score_rows` corpus rows (`score_block_rows`: on CPU
  small enough for the score block to stay in cache) and keeps only its candidates; the running
  list absorbs the candidates of `merge_rows` rows at a time, because on CPU merging into the
  list costs more than scoring (a top 2k of the list and the candidates: 31 ms for 1,024 queries
  whether they bring 512 or 2,048 candidates, against 4 ms to score 4,096 rows). Memory:
  `PrunedShape.working_set_bytes`."""
  num_queries, num_docs = queries_np.shape[0], corpus.shape[0]
  shape = pruned_shape(num_queries, num_docs, k, chunk_size=chunk_size,
                       query_chunk_size=query_chunk_size, device=mesh.devices.flat[0],
                       num_devices=mesh.devices.size)
  query_chunk, score_rows, keep, groups = (shape.query_chunk, shape.score_rows, shape.keep,
                                           shape.groups)
  select = {masked: _candidates_step(mesh, groups=groups, masked=masked, prefilter=prefilter)
            for masked in (False, True)}
  merge = _list_merge_step(keep)
  replicated = NamedSharding(mesh, P())
  rows_sharded = NamedSharding(mesh, P(mesh.axis_names))
  scoring_dtype = jnp.dtype(jnp.bfloat16) if prefilter else dtype
  query_starts = list(range(0, num_queries, query_chunk))
  query_blocks = [jax.device_put(_padded_rows(queries_np, s, query_chunk, scoring_dtype),
                                 replicated) for s in query_starts]
  state = [jax.device_put({
      "scores": jnp.full((query_chunk, keep), -jnp.inf, jnp.float32),
      "indices": jnp.full((query_chunk, keep), jnp.iinfo(jnp.int32).max, jnp.int32),
      "bound": jnp.full((query_chunk,), -jnp.inf, jnp.float32)}, replicated)
           for _ in query_starts]
  norms = []
  # A group of blocks (`merge_rows` rows) is placed, then each query block scores all of them and
  # merges their candidates: memory holds at most two groups of corpus rows (`_placed_chunks`
  # waits for the previous group's first query block) and one query block's candidates.
  blocks = _placed_chunks(corpus, mask, score_rows, rows_sharded, dtype, progress_desc,
                          lambda: state[0])
  while group := list(itertools.islice(blocks, shape.blocks_per_merge)):
    if prefilter:  # once per block, not per query block
      rounded = []
      for start, emb, valid, masked in group:
        high, block_norms = _bfloat16_parts(mesh)(emb)
        norms.append(block_norms)
        rounded.append((start, high, valid, masked))
      group = rounded
    for i, queries_block in enumerate(query_blocks):
      found = [select[masked](queries_block, emb, valid, jnp.int32(start))
               for start, emb, valid, masked in group]
      state[i] = merge(state[i], *zip(*found))

  gather = lambda name: np.concatenate([np.asarray(s[name]) for s in state])[:num_queries]
  scores, indices, bound = gather("scores"), gather("indices"), gather("bound")
  if prefilter:
    # max |d_hi|, |d - d_hi|, |d| over all blocks
    corpus_norms = np.max(np.stack([np.asarray(n) for n in norms]), axis=0).astype(np.float64)
    error = _prefilter_error(queries_np, corpus_norms, corpus.shape[1])
    scores, indices = _rescore(queries_np, corpus, scores, indices, error, k)
    bound = bound + error
  else:
    scores, indices = scores[:, :k], indices[:, :k]
  uncertified = np.flatnonzero(~(bound < scores[:, k - 1]))
  return scores, indices.astype(np.int64), uncertified


@dataclasses.dataclass(frozen=True)
class PrunedShape:
  """The block structure of one pruned scan (`pruned_shape`)."""
  query_chunk: int  # queries per block
  score_rows: int  # corpus rows scored per step (all devices)
  blocks_per_merge: int  # steps whose candidates the running list absorbs at once
  keep: int  # length of the running list per query
  groups: int  # groups of _TOPK_GROUP scores a device's block contributes per query
  num_devices: int

  def working_set_bytes(self, dim: int, num_queries: int, itemsize: int = 4) -> int:
    """Per-device bytes the scan holds at most, independent of the corpus size: two groups of
    placed corpus rows (one being scored, the next being placed), every query block, one score
    block, one query block's candidates of a group, and the running lists."""
    local_rows = self.score_rows // self.num_devices
    num_query_blocks = -(-num_queries // self.query_chunk)
    candidates = self.groups * _TOPK_GROUP * self.num_devices
    return (2 * self.blocks_per_merge * local_rows * dim * itemsize
            + num_query_blocks * self.query_chunk * dim * itemsize
            + self.query_chunk * local_rows * 4
            + self.blocks_per_merge * self.query_chunk * candidates * 8
            + num_query_blocks * self.query_chunk * self.keep * 8)


def pruned_shape(num_queries: int, num_docs: int, k: int, *, chunk_size: int | None = None,
                 query_chunk_size: int | None = None, device=None,
                 num_devices: int = 1) -> PrunedShape:
  """The blocks the pruned scan of this search uses on `device` (None: jax's first device);
  chunk sizes None: `default_block_shape`."""
  device = jax.devices()[0] if device is None else device
  default_chunk, default_query_chunk = default_block_shape(device)
  query_chunk, chunk = block_shapes(
      num_queries, num_docs, num_devices=num_devices,
      chunk_size=default_chunk if chunk_size is None else chunk_size,
      query_chunk_size=default_query_chunk if query_chunk_size is None else query_chunk_size)
  _, score_rows = block_shapes(num_queries, num_docs, num_devices=num_devices,
                               chunk_size=score_block_rows(device, query_chunk, chunk,
                                                           num_devices))
  local_rows = score_rows // num_devices
  # The list: 2k, so that the evicted scores sit well below the k-th (a list of 1.5k left 6% of
  # the benchmark's queries uncertified and was slower).
  keep = min(2 * k, num_docs)
  # Groups a device's block contributes: about twice a query's expected share of the list in a
  # block of a corpus in random order (a clustered corpus only costs fallbacks), at least 8: a
  # block then drops a document of the top k only if 9 of them fall into it, which for 4,096 of
  # 1M random documents (0.4 expected) happens to one query in a billion.
  groups = max(_MIN_GROUPS, min(keep, math.ceil(2 * keep * local_rows / num_docs)))
  return PrunedShape(query_chunk=query_chunk, score_rows=score_rows,
                     blocks_per_merge=max(1, merge_rows(device, chunk) // score_rows),
                     keep=keep, groups=groups, num_devices=num_devices)


def score_block_rows(device, query_chunk: int, chunk: int, num_devices: int = 1) -> int:
  """Corpus rows the pruned scan scores per step: the chunk on accelerators; on CPU at most
  `_CPU_SCORE_BLOCK` elements of [query chunk, rows per device] scores, which stay in cache
  between the matrix product that writes them and the selection that reads them (1,024 x 4,096
  float32 = 16 MiB: 2.4 ms, against 66 ms for 1,024 x 32,768 = 128 MiB, 3.4x the time per score
  on the development machine)."""
  if device.platform != "cpu":
    return chunk
  local = max(_TOPK_GROUP, _CPU_SCORE_BLOCK // max(1, query_chunk))
  return min(chunk, local * num_devices)


def merge_rows(device, chunk: int) -> int:
  """Corpus rows whose candidates the pruned scan merges into its running list at once: the
  chunk on accelerators, at least `_CPU_MERGE_ROWS` on CPU, where each merge is a top 2k over
  the list and the new candidates and costs about the same for 500 as for 4,000 of them
  (benchmarks/README.md: 10k x 1M, merging every 131,072 rows instead of 32,768: -2 s)."""
  return max(chunk, _CPU_MERGE_ROWS) if device.platform == "cpu" else chunk


@functools.lru_cache(maxsize=32)
def _candidates_step(mesh: Mesh, *, groups: int, masked: bool, prefilter: bool):
  """Jitted (queries, block, valid, offset) -> (candidate scores [B, M], their corpus indices,
  bound [B]) of one scored block, gathered from every device in index order; every document of
  the block left out scores at most `bound`."""
  axes = mesh.axis_names

  def per_device(queries, block, valid, offset):
    first_index = offset + lax.axis_index(axes) * block.shape[0]
    scores = lax.dot_general(queries, block, (((1,), (1,)), ((), ())),
                             precision=None if prefilter else _HIGHEST,
                             preferred_element_type=jnp.float32)
    candidates, positions, bound = _chunk_candidates(scores, valid if masked else None, groups)
    return (lax.all_gather(candidates, axes, axis=1, tiled=True),
            lax.all_gather(positions + first_index, axes, axis=1, tiled=True),
            lax.pmax(bound, axes))

  sharded = P(axes)
  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), sharded, sharded, P()),
                         out_specs=(P(), P(), P()), check_vma=False)
  return jax.jit(mapped)


@functools.lru_cache(maxsize=8)
def _list_merge_step(keep: int):
  """Jitted (state, candidate scores, indices, bounds) -> state: the running list of `keep`
  (score, index) pairs absorbs the candidates of several blocks (tuples, in corpus order), and
  the bound grows by theirs and by the best evicted score."""

  def merge(state, scores, indices, bounds):
    # The list and the blocks' candidates are each in (-score, index) / index order, and every
    # listed index is below every new one, so top_k's lower-position rule is the index rule.
    merged_scores, merged_pos = _sliceable(lax.top_k(
        jnp.concatenate([state["scores"], *scores], axis=1), keep + 1))
    merged_idx = jnp.take_along_axis(jnp.concatenate([state["indices"], *indices], axis=1),
                                     merged_pos, axis=1)
    bound = functools.reduce(jnp.maximum, bounds, state["bound"])
    return {"scores": merged_scores[:, :keep], "indices": merged_idx[:, :keep],
            "bound": jnp.maximum(bound, merged_scores[:, keep])}

  return jax.jit(merge, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _bfloat16_parts(mesh: Mesh):
  """Jitted float32 chunk -> (its bfloat16 rounding, [max |d_hi|, max |d - d_hi|, max |d|] over
  all its rows on all devices), for the prefilter's scores and error bound."""
  axes = mesh.axis_names

  def per_device(chunk):
    high = chunk.astype(jnp.bfloat16)
    row_max = lambda x: jnp.max(jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=1)))
    norms = jnp.stack([row_max(high), row_max(chunk - high.astype(jnp.float32)), row_max(chunk)])
    return high, lax.pmax(norms, axes)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(axes),
                               out_specs=(P(axes), P()), check_vma=False))


def _chunk_candidates(scores, valid, groups: int):
  """A chunk's candidates for the running list, in position order, and a bound on the rest.

  [B, C] scores -> (candidate scores [B, M], positions [B, M], bound [B]): every position not
  returned has a (masked, canonical) score <= bound. With groups of G scores: the `groups` best
  groups by maximum (bound: the next group's maximum); for small or uneven chunks the best
  groups * G scores themselves (bound: the next score), or every score (bound: -inf)."""
  batch, size = scores.shape
  group = _TOPK_GROUP
  row_valid = None if valid is None else valid[None, :]
  if size % group or size // group <= groups:
    masked = _masked(scores, row_valid)
    take = groups * group
    if take >= size:
      positions = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (batch, size))
      return masked, positions, jnp.full((batch,), -jnp.inf, jnp.float32)
    values, positions = _sliceable(lax.top_k(masked, take + 1))
    order = jnp.argsort(positions[:, :take], axis=1)
    return (jnp.take_along_axis(values[:, :take], order, axis=1),
            jnp.take_along_axis(positions[:, :take], order, axis=1), values[:, take])
  return _best_groups(scores, valid, groups, with_bound=True)


def _sliceable(top_k_outputs):
  """lax.top_k's outputs, safe to slice: XLA's CPU backend turns a top_k whose outputs are sliced
  into a full sort of the row (measured: 490 ms instead of 70 ms for the top 201 of 3125 x 1000);
  the barrier keeps the top_k as it is. One barrier per output: a barrier on the (values,
  indices) tuple crashes XLA's CPU compiler inside shard_map over several devices (jaxlib 0.10.2,
  "optimization_barrier ... cannot be downcasted to HloGetTupleElementInstruction")."""
  return tuple(lax.optimization_barrier(x) for x in top_k_outputs)


def _rescore(queries, corpus, approx, indices, error, k: int):
  """The listed candidates re-scored in float32, the k best by (-score, index).

  approx [Q, keep] (bfloat16-input scores, best first; -inf: no allowed document), indices,
  error [Q] (`_prefilter_error`). Only a query's candidates with approx >= its k-th approx - 2
  error are re-scored: any other one scores below the k best of those (each of which scores at
  least the k-th approx - error), so it cannot be in the top k."""
  num_queries, keep = indices.shape
  dim = corpus.shape[1]
  needed = np.sum(approx >= (approx[:, k - 1] - 2 * error)[:, None], axis=1)
  out_scores = np.empty((num_queries, k), np.float32)
  out_indices = np.empty((num_queries, k), np.int64)
  rows = max(1, _TARGET_GATHER_BUDGET // max(1, keep * dim))
  for start in range(0, num_queries, rows):
    block = slice(start, start + rows)
    width = int(max(k, needed[block].max()))  # columns of this block to re-score
    ids = indices[block, :width]
    listed = np.isfinite(approx[block, :width])
    emb = np.asarray(corpus[np.where(listed, ids, 0).reshape(-1)], np.float32).reshape(
        ids.shape + (dim,))
    query_block = np.asarray(queries[block], np.float32)
    # float32 products, one BLAS matrix-vector product per query (numpy's stacked matmul)
    exact = np.matmul(emb, query_block[:, :, None])[:, :, 0]
    exact = np.where(listed, exact + 0.0, -np.inf)  # + 0.0: -0.0 and +0.0 tie
    order = np.lexsort((ids, -exact), axis=1)[:, :k]
    out_scores[block] = np.take_along_axis(exact, order, axis=1)
    out_indices[block] = np.take_along_axis(ids, order, axis=1)
  return out_scores, out_indices


def _prefilter_error(queries, norms, dim: int) -> np.ndarray:
  """[Q] bound on |float32 score - bfloat16-input score| over every document, per query.

  With q = qh + ql and d = dh + dl (bfloat16 parts, exact residuals): q.d - qh.dh = qh.dl +
  ql.dh + ql.dl, at most |qh||dl| + |ql||dh| + |ql||dl| (Cauchy-Schwarz); the bfloat16 products are
  exact in float32, so the two float32 sums add at most gamma_D (|qh||dh| + |q||d|). Document
  norms are the corpus maxima; 1% and an absolute 1e-30 cover the rounding of the norms."""
  q = np.asarray(queries, np.float32)
  high = q.astype(jnp.bfloat16).astype(np.float64)
  low = q.astype(np.float64) - high
  norm = lambda x: np.sqrt(np.sum(np.square(x), axis=1))
  q_high, q_low, q_full = norm(high), norm(low), norm(q.astype(np.float64))
  d_high, d_low, d_full = norms
  gamma = dim * _F32_UNIT_ROUNDOFF / (1 - dim * _F32_UNIT_ROUNDOFF)
  error = (q_high * d_low + q_low * d_high + q_low * d_low
           + gamma * (q_high * d_high + q_full * d_full))
  return (error * 1.01 + 1e-30).astype(np.float64)


# --- inputs -----------------------------------------------------------------------------------
def _as_host_or_device(x):
  """jax arrays stay as they are (sliced on device), NumPy arrays (memory maps included) and
  row-addressable views such as store.ShardedEmbeddings too: rows are read chunk by chunk.
  Anything else (lists) becomes a NumPy array."""
  if isinstance(x, (jax.Array, np.ndarray)) or (
      hasattr(x, "shape") and hasattr(x, "ndim") and hasattr(x, "__getitem__")):
    return x
  return np.asarray(x)


def _check_shapes(queries, corpus, k: int) -> tuple[int, int, int]:
  if queries.ndim != 2 or corpus.ndim != 2:
    raise SearchInputError(
        f"queries and corpus must be 2-D [rows, dim] embeddings, found shapes {queries.shape} "
        f"and {corpus.shape}")
  if queries.shape[1] != corpus.shape[1]:
    raise SearchInputError(
        f"queries and corpus must have the same embedding dimension, found {queries.shape[1]} "
        f"(queries) and {corpus.shape[1]} (corpus); embed both with the same model")
  num_docs = corpus.shape[0]
  if queries.shape[0] == 0:
    raise SearchInputError("no queries to search (queries has 0 rows)")
  if num_docs >= 2**31 - 1:
    raise SearchInputError(f"corpus of {num_docs} rows: indices are int32, so at most 2^31 - 2 "
                           "rows per search; split the corpus and merge the top-k lists")
  if not isinstance(k, (int, np.integer)) or k < 1 or k > num_docs:
    raise SearchInputError(
        f"k must be an integer in [1, {num_docs}] (the corpus size), found {k!r}")
  return queries.shape[0], num_docs, queries.shape[1]


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def _padded_rows(x, start: int, rows: int, dtype):
  """x[start:start + rows] cast to dtype, zero-padded to `rows` rows (one compiled shape)."""
  block = x[start:start + rows]
  if isinstance(block, jax.Array):
    block = block.astype(dtype)
    pad = rows - block.shape[0]
    return jnp.pad(block, ((0, pad), (0, 0))) if pad else block
  block = np.asarray(block).astype(dtype, copy=False)
  pad = rows - block.shape[0]
  return np.concatenate([block, np.zeros((pad, block.shape[1]), block.dtype)]) if pad else block


def _target_block(targets, queries, corpus, start: int, rows: int, dtype, sharding):
  """Targets of one query chunk and their scores, computed as the chunk scan computes scores."""
  ids = targets[start:start + rows]
  pad = rows - ids.shape[0]
  if pad:
    ids = np.concatenate([ids, np.full((pad, ids.shape[1]), -1, ids.dtype)])
  safe = np.maximum(ids, 0)
  query_block = jnp.asarray(_padded_rows(queries, start, rows, dtype))
  # The targets' embeddings are gathered a few query rows at a time: [rows, R, D] at once would
  # grow with the number of relevant documents per query (hundreds in some BEIR sets).
  step = max(1, _TARGET_GATHER_BUDGET // max(1, ids.shape[1] * corpus.shape[1]))
  scores = []
  for row in range(0, rows, step):
    block = safe[row:row + step]
    emb = jnp.asarray(corpus[block.reshape(-1)], dtype).reshape(block.shape + (corpus.shape[1],))
    scores.append(jnp.einsum("qd,qrd->qr", query_block[row:row + step], emb, precision=_HIGHEST,
                             preferred_element_type=jnp.float32))
  scores = _canonical(jnp.concatenate(scores))
  return jax.device_put({"ids": jnp.asarray(ids, jnp.int32), "scores": scores}, sharding)


def _initial_state(rows: int, k: int, num_targets: int, sharding) -> dict[str, Any]:
  state = {"scores": jnp.full((rows, k), -jnp.inf, jnp.float32),
           "indices": jnp.full((rows, k), jnp.iinfo(jnp.int32).max, jnp.int32)}
  if num_targets:
    state["counts"] = jnp.zeros((rows, num_targets), jnp.int32)
  return jax.device_put(state, sharding)


# --- the jitted step --------------------------------------------------------------------------
def _canonical(scores):
  """-0.0 -> +0.0, so that they tie in every top-k and sort (as they compare equal)."""
  return jnp.where(scores == 0, jnp.zeros_like(scores), scores)


def _sorted_topk(scores, indices, k: int):
  """The k best (score, index) pairs by (-score, index), best first. [B, M] -> [B, k]."""
  neg_sorted, idx_sorted = lax.sort((-scores, indices), dimension=-1, num_keys=2)
  return -neg_sorted[:, :k], idx_sorted[:, :k]


@functools.lru_cache(maxsize=32)
def _merge_step(mesh: Mesh, *, k: int, local_k: int, num_targets: int, target_group: int,
                masked: bool):
  """Jitted (state, queries, targets, chunk, valid, offset) -> state for one corpus chunk;
  `valid` is ignored (every row allowed) unless `masked`."""
  axes = mesh.axis_names

  def per_device(state, queries, targets, chunk, valid, offset):
    local_rows = chunk.shape[0]
    device = lax.axis_index(axes)
    first_index = offset + device * local_rows
    scores = lax.dot_general(queries, chunk, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                             preferred_element_type=jnp.float32)  # [B, C/n]
    valid = valid if masked else None
    local_scores, local_pos = _chunk_topk(scores, valid, local_k)
    gathered_scores = lax.all_gather(local_scores, axes, axis=1, tiled=True)  # [B, n*local_k]
    gathered_idx = lax.all_gather(local_pos + first_index, axes, axis=1, tiled=True)
    merged_scores, merged_idx = _sorted_topk(
        jnp.concatenate([state["scores"], gathered_scores], axis=1),
        jnp.concatenate([state["indices"], gathered_idx], axis=1), k)
    new_state = {"scores": merged_scores, "indices": merged_idx}
    if num_targets:
      doc_index = first_index + jnp.arange(local_rows, dtype=jnp.int32)
      counts = _count_ranked_above(
          _masked(scores, None if valid is None else valid[None, :]), doc_index, targets,
          target_group)
      new_state["counts"] = state["counts"] + lax.psum(counts, axes)
    return new_state

  sharded = P(axes)
  state_spec = {"scores": P(), "indices": P()}
  if num_targets:
    state_spec["counts"] = P()
  target_spec = {"ids": P(), "scores": P()} if num_targets else None
  mapped = jax.shard_map(
      per_device, mesh=mesh, in_specs=(state_spec, P(), target_spec, sharded, sharded, P()),
      out_specs=state_spec, check_vma=False)
  return jax.jit(mapped, donate_argnums=0)


def _masked(scores, valid):
  """Scores of allowed rows, canonical; -inf for padding and masked-out rows (valid None: all
  rows allowed)."""
  return _canonical(scores) if valid is None else jnp.where(valid, _canonical(scores), -jnp.inf)


def _chunk_topk(scores, valid, k: int):
  """lax.top_k(_masked(scores, valid), k) ([B, C] -> [B, k], lower position first among ties),
  faster for C >> k.

  `lax.top_k` on CPU is a sequential heap scan of every score. Instead, take the maximum of each
  group of G consecutive scores, the k best groups by that maximum (lower group first among
  ties), and the top k of those groups' k * G scores, gathered in position order. Exact: the k
  best groups hold every element of the top k, ties included. (At most k-1 groups have a
  maximum above the k-th best value v, and each contains an element above v; so any element
  above v is in such a group; and an element equal to v that the top k takes, being among the
  first k - #(> v) such by position, cannot lie in a group after the k - #(groups above v)
  earliest groups with maximum v, which would already hold that many earlier elements equal
  to v.)
  """
  size, group = scores.shape[1], _TOPK_GROUP
  if size < _TOPK_MIN_RATIO * k * group or size % group:
    return lax.top_k(_masked(scores, None if valid is None else valid[None, :]), k)
  candidates, positions, _ = _best_groups(scores, valid, k, with_bound=False)  # [B, k * G]
  top_scores, top = lax.top_k(candidates, k)
  return top_scores, jnp.take_along_axis(positions, top, axis=1)


def _best_groups(scores, valid, groups: int, *, with_bound: bool):
  """The scores of the `groups` best groups of G consecutive scores by their maximum (lower
  group first among ties), in position order: (candidates [B, groups * G], positions, bound [B]
  = the next group's maximum, which no other score exceeds; None without `with_bound`)."""
  batch, size = scores.shape
  group = _TOPK_GROUP
  # Without a mask (every chunk but a padded last one, unless corpus_mask is given) nothing of
  # size [B, C] is written besides the scores themselves: the reduction reads them straight from
  # the matrix product, and canonicalising the maxima equals maximising canonical scores. An
  # elementwise mask on the whole block costs a third of the step on CPU.
  if valid is None:
    group_max = _canonical(jnp.max(scores.reshape(batch, size // group, group), axis=2))
  else:
    group_max = jnp.max(_masked(scores, valid[None, :]).reshape(batch, size // group, group),
                        axis=2)
  bound = None
  if with_bound:
    best_values, best = _sliceable(lax.top_k(group_max, groups + 1))
    bound, best = best_values[:, groups], best[:, :groups]
  else:
    _, best = lax.top_k(group_max, groups)
  best = jnp.sort(best, axis=1)  # position order, so top_k's tie rule holds downstream
  positions = (best[:, :, None] * group + jnp.arange(group)[None, None, :]).reshape(
      batch, groups * group)
  candidates = _masked(jnp.take_along_axis(scores, positions, axis=1),
                       None if valid is None else valid[positions])
  return candidates, positions, bound


def _count_ranked_above(scores, doc_index, targets, target_group: int):
  """[B, R] number of this device's rows ranked above each target by (-score, index).

  Masked rows have score -inf and so never count (a target's score is finite). A target's own
  row is excluded by index, whatever score the chunk's matrix product gave it.
  """
  def count_one(target):
    ids, target_scores = target  # [B], [B]
    above = (scores > target_scores[:, None]) | (
        (scores == target_scores[:, None]) & (doc_index[None, :] < ids[:, None]))
    above &= doc_index[None, :] != ids[:, None]
    return jnp.sum(above, axis=1, dtype=jnp.int32)

  counts = lax.map(count_one, (targets["ids"].T, targets["scores"].T), batch_size=target_group)
  return jnp.where(targets["ids"] >= 0, counts.T, 0)


def _positions_in_list(targets, indices) -> np.ndarray:
  """[Q, R]: 1-based position of each target in its row of indices, 0 where absent."""
  k = indices.shape[1]
  position = np.zeros(targets.shape, np.int64)
  rows = max(1, _TARGET_GATHER_BUDGET // max(1, targets.shape[1] * k))
  for start in range(0, len(targets), rows):  # [rows, R, k] comparisons at a time
    block = slice(start, start + rows)
    hit = (targets[block, :, None] == indices[block, None, :]) & (targets[block, :, None] >= 0)
    position[block] = np.where(hit.any(axis=-1), hit.argmax(axis=-1) + 1, 0)
  return position


def _take_rows(x, rows: np.ndarray):
  return x[jnp.asarray(rows)] if isinstance(x, jax.Array) else np.asarray(x[rows])
