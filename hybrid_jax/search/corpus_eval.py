"""Corpus-scale evaluation: every query searched against one whole corpus (BEIR, MKQA).

The LAReQA grid scores a pool of ~20k candidates held in memory. MIRACL, BEIR-NQ or the MKQA
Wikipedia corpus hold millions of passages, so here:
  - the corpus is streamed from `corpus.jsonl` (its texts are never all in memory) and embedded
    into a shard store (search/store.py) that later runs reuse and an interrupted run resumes;
  - queries are embedded (and cached) like the grid's;
  - every query is searched EXACTLY over the whole corpus (search/topk.py): top-k for the TREC run
    file and the metrics, plus, where the metric needs it, the full-corpus rank of each relevant
    document. Nothing of size [queries, corpus] is built, so peak memory is the embeddings plus
    one search chunk, whatever the corpus size.
Subclasses say what is relevant and how it is scored: beir_eval.BeirEvaluator (qrels) and
mkqa.MkqaEvaluator (answer strings in the retrieved passages).

Reports are the grid evaluator's files (results.json, results.md, per_query.npz, settings.csv,
plots; eval/report.py), so `python -m hybrid_jax.compare` works on them, plus `run.trec`. The
corpus is the pool of the grid's terms: per-query values live in its "all" column, and query
languages are the settings X -> corpus (eval/grid.py `summarize(pool_only=True)`), except for a
corpus with one language and no language tags (MIRACL-style), reported as the monolingual X->X.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from hybrid_jax import errors
from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import embeddings_io
from hybrid_jax.eval import grid_evaluator
from hybrid_jax.eval import report
from hybrid_jax.search import store as store_lib
from hybrid_jax.search import topk
from hybrid_jax.search import trec

EmbedFn = Callable[[Sequence[str], str], np.ndarray]
RUN_FILE = "run.trec"
SEARCH_DTYPES = ("float32", "bfloat16")
STORE_DIR = "corpus"  # the store's subdirectory of an embeddings / cache directory


class CorpusEvalError(errors.UserError):
  """Corpus, queries or embeddings of a corpus-scale evaluation do not fit together."""


@dataclasses.dataclass(frozen=True)
class CorpusQueries(collection_lib.QueryCounts):
  """The queries of a corpus-scale evaluation and the ids of its corpus (never its texts).

  Duck-types what the runner and eval/report.py read of a Collection: name, languages, query
  uids / texts / languages, candidate_uids, num_queries, num_candidates, cross_lingual.
  """
  name: str
  languages: list[str]  # query languages, report order
  query_uids: list[str]
  query_texts: list[str]
  query_langs: list[str]
  candidate_uids: list[str]  # document ids in corpus.jsonl order
  corpus_path: str
  cross_lingual: bool = False  # False: monolingual (X->X) report, True: X -> the whole corpus

  def __post_init__(self):
    for name in ("query_texts", "query_langs"):
      if len(getattr(self, name)) != len(self.query_uids):
        raise CorpusEvalError(f"{self.name}: {name} has {len(getattr(self, name))} entries for "
                              f"{len(self.query_uids)} queries")
    duplicates = _first_duplicate(self.query_uids)
    if duplicates is not None:
      raise CorpusEvalError(f"{self.name}: query id {duplicates!r} appears more than once")


def _first_duplicate(items: Sequence[str]) -> str | None:
  seen = set()
  for item in items:
    if item in seen:
      return item
    seen.add(item)
  return None


# --- the corpus file, streamed ------------------------------------------------------------------
def tagged_language(row: Mapping) -> str | None:
  """A BEIR row's language tag: `metadata.lang` (how search/convert_lareqa.py writes it) or a
  top-level `lang`; None when untagged (MIRACL, BEIR)."""
  metadata = row.get("metadata")
  lang = metadata.get("lang") if isinstance(metadata, Mapping) else None
  return str(lang or row.get("lang") or "") or None


def read_corpus_ids(corpus_path: str) -> tuple[list[str], set[str]]:
  """(document ids in file order, the language tags found); one streaming pass, texts dropped.

  Repeated ids are found through an array of 64-bit string hashes (8 bytes per document), not a
  set of all ids, so a 20M-passage corpus costs little beyond its id list."""
  ids, langs = [], set()
  for _, row in collection_lib.iter_jsonl(corpus_path, ("_id", "text")):
    ids.append(str(row["_id"]))
    lang = tagged_language(row)
    if lang:
      langs.add(lang)
  if not ids:
    raise CorpusEvalError(f"{corpus_path} is empty; expected one JSON object per document.")
  hashes = np.fromiter((hash(i) for i in ids), np.int64, len(ids))
  order = np.argsort(hashes, kind="stable")
  same_hash = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
  for j in same_hash:
    first, again = int(order[j]), int(order[j + 1])
    if ids[first] == ids[again]:
      raise CorpusEvalError(
          f"{corpus_path}: document _id {ids[first]!r} appears on two rows (documents "
          f"{first + 1} and {again + 1}); ids must be unique in a corpus (deduplicate "
          "corpus.jsonl).")
  return ids, langs


def iter_corpus(corpus_path: str) -> Iterator[tuple[str, str]]:
  """(document id, text to embed = "title text") in file order, streamed."""
  for _, row in collection_lib.iter_jsonl(corpus_path, ("_id", "text")):
    yield str(row["_id"]), collection_lib.beir_doc_text(row)


# --- the evaluator base ---------------------------------------------------------------------------
class CorpusEvaluator:
  """Embeds, searches and reports one corpus-scale evaluation; subclasses score the search."""

  type_name = ""
  default_trec_depth = trec.DEFAULT_DEPTH

  def __init__(self, *, query_prefix: str = "Query: ", passage_prefix: str = "Passage: ",
               groups: Mapping[str, Sequence[str]] | None = None, normalize: bool = True,
               mesh: Mesh | None = None, show_progress: bool = True,
               training_languages: Sequence[str] | None = None, corpus_store: str = "",
               store_shard_size: int = store_lib.DEFAULT_SHARD_SIZE,
               store_dtype: str = "float32", trec_depth: int = 0,
               search_dtype: str = "float32", search_chunk_size: int | None = None,
               search_query_chunk_size: int | None = None):
    """
    Args (besides the grid evaluator's prefixes, groups, normalize, mesh, show_progress and
    training_languages, see eval/grid_evaluator.py):
      corpus_store: directory of the corpus embeddings (default: <cache dir>/corpus, so
        under the output directory); several evaluations of one model and corpus may share one.
      store_shard_size: passages per shard (the unit of resume).
      store_dtype: "float32" or "float16" on disk.
      trec_depth: documents per query in run.trec (0: the evaluator's default).
      search_dtype: "float32" or "bfloat16" embeddings in the search (scores in float32).
      search_chunk_size / search_query_chunk_size: the search's chunk sizes (bound its memory);
        None = `topk.default_block_shape` of the device.
    """
    if search_dtype not in SEARCH_DTYPES:
      raise grid_evaluator.EvaluatorConfigError(
          f"search_dtype {search_dtype!r}: expected one of {SEARCH_DTYPES}")
    if store_dtype not in store_lib.DTYPES:
      raise grid_evaluator.EvaluatorConfigError(
          f"store_dtype {store_dtype!r}: expected one of {store_lib.DTYPES}")
    self._collection = None
    self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
    self.groups = {k: tuple(v) for k, v in (groups or {}).items()}
    self.normalize = normalize
    self.mesh = mesh
    self.show_progress = show_progress
    self.training_languages = None if training_languages is None else tuple(training_languages)
    self.corpus_store = corpus_store
    self.store_shard_size = int(store_shard_size)
    self.store_dtype = store_dtype
    chunk_sizes = [int(size) for size in (search_chunk_size, search_query_chunk_size)
                   if size is not None]
    if int(trec_depth) < 0 or any(size < 1 for size in chunk_sizes):
      raise grid_evaluator.EvaluatorConfigError(
          f"trec_depth must be >= 0 (0: the default) and the search chunk sizes >= 1, found "
          f"trec_depth={trec_depth}, search_chunk_size={search_chunk_size}, "
          f"search_query_chunk_size={search_query_chunk_size}")
    self.trec_depth = int(trec_depth) or self.default_trec_depth
    self.search_dtype = search_dtype
    self.search_chunk_size = None if search_chunk_size is None else int(search_chunk_size)
    self.search_query_chunk_size = (None if search_query_chunk_size is None
                                    else int(search_query_chunk_size))
    self.last_run = None  # (query uids, doc ids, indices, scores) of the latest score()
    self._temporary_stores: list[str] = []  # corpus stores of uncached runs, removed after use

  @staticmethod
  def common_spec_options(spec: Mapping) -> dict:
    """The constructor's corpus options from a config.evals / command-line spec."""
    names = ("corpus_store", "store_shard_size", "store_dtype", "trec_depth", "search_dtype",
             "search_chunk_size", "search_query_chunk_size")
    return {name: spec[name] for name in names if spec.get(name) not in (None, "")}

  # --- the collection, read on first use -------------------------------------------------------
  def _load_collection(self) -> CorpusQueries:
    raise NotImplementedError

  @property
  def collection(self) -> CorpusQueries:
    if self._collection is None:
      self._collection = self._load_collection()
    return self._collection

  def language_groups(self) -> dict[str, tuple[str, ...]]:
    groups = dict(self.groups)
    if self.training_languages is not None and grid_evaluator.UNSEEN_GROUP not in groups:
      unseen = grid_evaluator.unseen_languages(self.collection.languages,
                                               self.training_languages)
      if unseen:
        groups[grid_evaluator.UNSEEN_GROUP] = unseen
    return groups

  def _log(self, message: str) -> None:
    if self.show_progress:
      print(message, file=sys.stderr, flush=True)

  # --- embeddings --------------------------------------------------------------------------------
  def embed(self, embed_fn: EmbedFn, cache_dir: str | None = None,
            cache_key: Mapping | None = None, passage_embed_fn: EmbedFn | None = None
            ) -> tuple[np.ndarray, store_lib.ShardedEmbeddings]:
    """Query embeddings [Q, D] and the corpus store's embeddings.

    With a cache key (it must identify the encoder) both are cached: queries in
    <cache_dir>/queries, the corpus in `corpus_store` or <cache_dir>/corpus, and resumed or
    reused when the key and texts match. Without one (periodic evaluation during training) the
    corpus goes to a temporary store, removed by `evaluate`."""
    col = self.collection
    passage_embed_fn = passage_embed_fn or embed_fn
    key = None if cache_key is None else {**dict(cache_key), "normalize": self.normalize}
    if key is not None and cache_dir is not None:
      queries = store_lib.write_store(
          os.path.join(cache_dir, "queries"), zip(col.query_uids, col.query_texts),
          lambda texts: embed_fn(texts, self.query_prefix),
          key={**key, "prefix": self.query_prefix}, shard_size=max(1, col.num_queries),
          desc=None)
      query_emb = np.asarray(queries, np.float32)
    else:
      query_emb = np.asarray(embed_fn(list(col.query_texts), self.query_prefix), np.float32)
    if key is not None and (self.corpus_store or cache_dir):
      store_dir = self.corpus_store or os.path.join(cache_dir, STORE_DIR)
    else:
      store_dir = tempfile.mkdtemp(prefix="corpus_store_")
      self._temporary_stores.append(store_dir)
    started = time.time()
    corpus = store_lib.write_store(
        store_dir, iter_corpus(col.corpus_path),
        lambda texts: passage_embed_fn(texts, self.passage_prefix),
        key={**(key or {"uncached": store_dir}), "prefix": self.passage_prefix},
        shard_size=self.store_shard_size, dtype=self.store_dtype, num_docs=col.num_candidates,
        normalize=self.normalize, desc="embedding corpus" if self.show_progress else None)
    self._log(f"corpus embeddings ({corpus.shape[0]} x {corpus.shape[1]}) in {store_dir}, "
              f"{time.time() - started:.1f}s")
    return self._checked(query_emb, corpus, store_dir)

  def load_embeddings(self, directory: str) -> tuple[np.ndarray, store_lib.ShardedEmbeddings
                                                     | np.ndarray]:
    """Precomputed embeddings: queries.npy + queries.uids.txt, and the corpus either as a store
    in <directory>/corpus or as candidates.npy + candidates.uids.txt (memory-mapped)."""
    col = self.collection
    query_uids, query_emb = embeddings_io.load(directory, "queries")
    query_emb = embeddings_io.align(query_uids, query_emb, col.query_uids, "query", directory)
    manifest = store_lib.read_manifest(os.path.join(directory, STORE_DIR))
    if manifest is not None:
      corpus = store_lib.open_store(os.path.join(directory, STORE_DIR))
      if self.normalize and not manifest.get("normalized"):
        corpus = _NormalizedRows(corpus)
    else:
      npy_path, uid_path = embeddings_io.paths(directory, "candidates")
      if not (os.path.isfile(npy_path) and os.path.isfile(uid_path)):
        raise CorpusEvalError(
            f"{directory} has no corpus embeddings: expected a store in {STORE_DIR}/ "
            f"({store_lib.MANIFEST} + shards) or candidates.npy + candidates.uids.txt. Write "
            "them with --export_embeddings, or pass --model / --workdir to embed the corpus.")
      corpus = np.load(npy_path, mmap_mode="r", allow_pickle=False)
      with open(uid_path, encoding="utf-8") as f:
        ids = [line for line in f.read().split("\n") if line]
      corpus = _RowsWithIds(corpus, ids, uid_path)
      if self.normalize:
        corpus = _NormalizedRows(corpus)
    return self._checked(query_emb, corpus, directory)

  def _checked(self, query_emb, corpus, where: str):
    """The corpus embeddings must cover exactly the corpus's documents (any order)."""
    col = self.collection
    # The same order (a store written here) is checked without building sets of N ids.
    if corpus.ids != col.candidate_uids and (
        len(corpus.ids) != col.num_candidates or set(corpus.ids) != set(col.candidate_uids)):
      ids = set(corpus.ids)
      missing = [d for d in col.candidate_uids if d not in ids]
      known = set(col.candidate_uids)
      extra = [d for d in corpus.ids if d not in known]
      raise CorpusEvalError(
          f"{where}: the corpus embeddings hold {len(corpus.ids)} documents, "
          f"{col.corpus_path} {col.num_candidates}; {len(missing)} corpus ids have no embedding "
          f"(e.g. {missing[:3]}) and {len(extra)} embedded ids are not in the corpus (e.g. "
          f"{extra[:3]}). Embed this corpus (the store is rebuilt when the corpus changes).")
    if query_emb.shape[1] != corpus.shape[1]:
      raise embeddings_io.EmbeddingsError(
          f"query embeddings have width {query_emb.shape[1]} but the corpus embeddings "
          f"{corpus.shape[1]}; both must come from the same encoder.")
    if self.normalize:
      query_emb = embeddings_io.normalize_rows(query_emb)
    return query_emb.astype(np.float32), corpus

  def export_embeddings(self, directory: str, query_emb: np.ndarray, corpus) -> None:
    """The exchange format (eval/embeddings_io.py): queries and candidates .npy + uids."""
    embeddings_io.save(directory, "queries", self.collection.query_uids, query_emb)
    embeddings_io.save(directory, "candidates", corpus.ids, np.asarray(corpus, np.float32))

  # --- search ----------------------------------------------------------------------------------
  def search_mesh(self) -> Mesh:
    """Each corpus chunk is split over every device of the evaluator's mesh (default: all local
    devices)."""
    if self.mesh is not None:
      return self.mesh
    return Mesh(np.array(jax.local_devices()), ("corpus",))

  def search(self, query_emb: np.ndarray, corpus, k: int, targets=None) -> topk.SearchResult:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    started = time.time()
    result = topk.search_with_ranks(
        query_emb, corpus, min(k, corpus.shape[0]), targets=targets,
        chunk_size=self.search_chunk_size, query_chunk_size=self.search_query_chunk_size,
        mesh=self.search_mesh(), dtype=jnp.bfloat16 if self.search_dtype == "bfloat16"
        else jnp.float32, progress_desc="searching" if self.show_progress else None)
    self._log(f"searched {len(query_emb)} queries over {corpus.shape[0]} documents "
              f"(top {result.indices.shape[1]}) in {time.time() - started:.1f}s")
    return result

  # --- scoring and reports -----------------------------------------------------------------------
  def score(self, query_emb: np.ndarray, corpus):
    """(per-query metrics, results dict); sets `last_run` for the run file."""
    raise NotImplementedError

  def run_info(self) -> dict:
    """What results_meta.json records about the search besides the grid's fields."""
    return {"trec_depth": self.trec_depth, "search_dtype": self.search_dtype,
            "corpus": self.collection.corpus_path, "normalize": self.normalize}

  def summary_table(self, results: dict) -> str:
    return report.summary_table(results)

  def write_reports(self, output_dir: str, per_query, results: dict,
                    header_lines: Sequence[str] = (), meta: dict | None = None) -> list[str]:
    written = report.write_all(output_dir, self.collection, per_query, results, header_lines,
                               meta)
    if self.last_run is not None:
      query_uids, doc_ids, indices, scores = self.last_run
      written.append(trec.write_run(os.path.join(output_dir, RUN_FILE), query_uids, doc_ids,
                                    indices, scores, depth=self.trec_depth))
    return written

  def evaluate(self, embed_fn: EmbedFn, output_dir: str | None = None, *,
               passage_embed_fn: EmbedFn | None = None, cache_dir: str | None = None,
               cache_key: Mapping | None = None, header_lines: Sequence[str] = (),
               meta: dict | None = None) -> dict:
    """Encodes, searches, scores and (with `output_dir`) writes every report file."""
    self._temporary_stores = []
    try:
      query_emb, corpus = self.embed(embed_fn, cache_dir, cache_key, passage_embed_fn)
      return self.evaluate_embeddings(query_emb, corpus, output_dir, header_lines=header_lines,
                                      meta=meta)
    finally:
      for directory in self._temporary_stores:
        shutil.rmtree(directory, ignore_errors=True)
      self._temporary_stores = []

  def evaluate_embeddings(self, query_emb: np.ndarray, corpus, output_dir: str | None = None, *,
                          header_lines: Sequence[str] = (), meta: dict | None = None) -> dict:
    per_query, results = self.score(query_emb, corpus)
    if output_dir:
      self.write_reports(output_dir, per_query, results, header_lines, meta)
    return results


class _NormalizedRows:
  """L2-normalised rows of a corpus view (store or _RowsWithIds), normalised as they are read:
  cosine scoring of precomputed embeddings without a normalised copy of the corpus."""

  def __init__(self, rows):
    self.rows, self.ids = rows, rows.ids
    self.shape, self.ndim, self.dtype = rows.shape, 2, np.dtype(np.float32)

  def __getitem__(self, index):
    block = np.asarray(self.rows[index], np.float32)
    return embeddings_io.normalize_rows(block)

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self[:], dtype)


class _RowsWithIds:
  """A [N, D] array (e.g. a memory-mapped candidates.npy) with its ids, read like a store."""

  def __init__(self, rows: np.ndarray, ids: list[str], uid_path: str):
    if rows.ndim != 2 or len(rows) != len(ids):
      raise embeddings_io.EmbeddingsError(
          f"{uid_path} has {len(ids)} ids but the embeddings have shape {rows.shape}; one id per "
          "row, in row order.")
    duplicate = _first_duplicate(ids)
    if duplicate is not None:
      raise embeddings_io.EmbeddingsError(f"{uid_path}: id {duplicate!r} appears twice")
    self.rows, self.ids = rows, ids
    self.shape, self.ndim, self.dtype = rows.shape, 2, rows.dtype

  def __getitem__(self, index):
    return np.asarray(self.rows[index])

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self.rows, dtype)
