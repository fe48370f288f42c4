"""The grid evaluator: encode a collection with any embedding function (cached), score, report.

`GridEvaluator` holds everything that does not depend on where a collection comes from; its
subclasses (eval/evaluators.py: LAReQA and BEIR directories, eval/synthetic_eval.py: the synthetic
data's held-out ids) only say how the collection is read and how a `config.evals` spec maps to
their arguments (`from_spec`). The registry of those types is eval/evaluators.py; this module
imports none of them, so that every subclass module can import it without a circle.

`embed_fn(texts, prefix) -> np.ndarray [N, D] float32`: the texts in order, the prefix ("Query: ",
"Passage: ") to prepend. The collection is read lazily, on the first use. Embeddings are
L2-normalised before scoring (cosine similarity, PAPER.md) unless `normalize=False`.

`center_languages=True` is a training-free baseline for language bias (the LIR / SHIFT family of
post-hoc methods): after normalising, each language's mean query embedding is subtracted from its
queries and each language's mean candidate embedding from its candidates, and the rows are
normalised again before scoring. The means come from the scored collection's own queries and
candidates (unsupervised: no relevance labels are read), so they are the evaluated part's (e.g.
the held-out articles of `--part=test`); results.json then holds `"center_languages": true`
(a plain evaluation's results.json has no such key, as in DESIGN.md's schema).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from hybrid_jax import errors
from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import embeddings_io
from hybrid_jax.eval import grid as grid_lib
from hybrid_jax.eval import metrics as metrics_lib
from hybrid_jax.eval import report

EmbedFn = Callable[[Sequence[str], str], np.ndarray]


class EvaluatorConfigError(errors.UserError):
  """An evaluator spec (config.evals.<name> or the evaluate command line) cannot be built."""


def _texts_digest(prefix: str, texts: Sequence[str]) -> str:
  digest = hashlib.sha1(prefix.encode("utf-8"))
  for t in texts:
    digest.update(b"\x00" + t.encode("utf-8"))
  return digest.hexdigest()


def _check_embeddings(x: np.ndarray, n: int, kind: str) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or len(x) != n:
    raise embeddings_io.EmbeddingsError(
        f"embed_fn returned {kind} embeddings of shape {x.shape}, expected [{n}, dim]")
  if not np.isfinite(x).all():
    raise embeddings_io.EmbeddingsError(f"embed_fn returned NaN or inf {kind} embeddings")
  return x


def center_by_language(emb: np.ndarray, langs: Sequence[str]) -> np.ndarray:
  """[N, D] rows minus the mean row of their language (means accumulated in float64).

  Removes what all texts of a language share (the direction that makes same-language texts
  look alike), keeping what distinguishes them. A language with one row centres it to zero."""
  emb = np.asarray(emb, np.float32)
  langs = np.asarray([str(lang) for lang in langs])
  names, index = np.unique(langs, return_inverse=True)
  sums = np.zeros((len(names), emb.shape[1]))
  np.add.at(sums, index, emb.astype(np.float64))
  means = sums / np.bincount(index, minlength=len(names))[:, None]
  return (emb - means[index]).astype(np.float32)


UNSEEN_GROUP = "unseen"


def unseen_languages(evaluation_languages: Sequence[str],
                     training_languages: Sequence[str]) -> tuple[str, ...]:
  """The evaluation languages never seen in fine-tuning, in evaluation order (e.g. training on
  MLQA-R, ar de en es hi vi zh, evaluating on XQuAD-R: el ru th tr)."""
  seen = set(training_languages)
  return tuple(lang for lang in evaluation_languages if lang not in seen)


class GridEvaluator:
  """Scores one collection on the full grid. Subclasses say how the collection is read."""

  name = "grid"
  type_name = ""  # the `type` of config.evals specs that build this class ("" = not buildable)

  def __init__(self, collection: collection_lib.Collection | None = None, *,
               query_prefix: str = "Query: ", passage_prefix: str = "Passage: ",
               groups: Mapping[str, Sequence[str]] | None = None, normalize: bool = True,
               mesh=None, show_progress: bool = True,
               training_languages: Sequence[str] | None = None,
               center_languages: bool = False):
    self._collection = collection
    # The languages the scored model was fine-tuned on (None: unknown, e.g. a zero-shot model):
    # with them, the summaries also average over an "unseen" group (language_groups()).
    self.training_languages = None if training_languages is None else tuple(training_languages)
    self.query_prefix = query_prefix
    self.passage_prefix = passage_prefix
    self.groups = {k: tuple(v) for k, v in (groups or {}).items()}
    self.normalize = normalize
    self.center_languages = center_languages  # subtract per-language means (module docstring)
    self.mesh = mesh
    self.show_progress = show_progress

  def language_groups(self) -> dict[str, tuple[str, ...]]:
    """The groups averaged in the summaries: the given ones, plus "unseen" = the collection's
    languages the model was not fine-tuned on, when the training languages are known and the
    given groups do not define "unseen" themselves."""
    groups = dict(self.groups)
    if self.training_languages is not None and UNSEEN_GROUP not in groups:
      unseen = unseen_languages(self.collection.languages, self.training_languages)
      if unseen:
        groups[UNSEEN_GROUP] = unseen
    return groups

  @classmethod
  def from_spec(cls, name: str, spec: Mapping, **common) -> "GridEvaluator":
    """The evaluator of one config.evals spec; `common` holds the GridEvaluator arguments
    (prefixes, groups, normalize, mesh, show_progress) already resolved by the registry."""
    raise NotImplementedError(f"{cls.__name__} cannot be built from a config.evals spec")

  # --- the collection, read on first use ---------------------------------------------------------
  def _load_collection(self) -> collection_lib.Collection:
    """Reads the collection; only subclasses know from where."""
    raise ValueError("GridEvaluator was built without a collection: pass collection=... or use "
                     "LareqaEvaluator / BeirEvaluator, which read theirs from files")

  @property
  def collection(self) -> collection_lib.Collection:
    if self._collection is None:
      self._collection = self._load_collection()
    return self._collection

  # --- encoding ----------------------------------------------------------------------------------
  def embed(self, embed_fn: EmbedFn, cache_dir: str | None = None,
            cache_key: Mapping | None = None, passage_embed_fn: EmbedFn | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Query and candidate embeddings [Q, D], [N, D]; reuses `cache_dir` when its key matches.

    `passage_embed_fn` (default: `embed_fn`) encodes the candidates, e.g. with a longer maximum
    length. The cache is the embeddings exchange format plus `<kind>.meta.json` holding
    `cache_key` (which must identify the encoder) and a digest of the prefixed texts.
    """
    col = self.collection
    out = []
    for kind, uids, texts, prefix, fn in (
        ("queries", col.query_uids, col.query_texts, self.query_prefix, embed_fn),
        ("candidates", col.candidate_uids, col.candidate_texts, self.passage_prefix,
         passage_embed_fn or embed_fn)):
      meta = None
      if cache_dir is not None and cache_key is not None:
        meta = {"key": dict(cache_key), "prefix": prefix, "texts_sha1": _texts_digest(prefix, texts),
                "num": len(texts)}
        cached = self._read_cache(cache_dir, kind, meta, uids)
        if cached is not None:
          out.append(cached)
          continue
      start = time.time()
      emb = _check_embeddings(fn(list(texts), prefix), len(texts), kind)
      if self.show_progress:
        print(f"embedded {len(texts)} {kind} in {time.time() - start:.1f}s", file=sys.stderr)
      if meta is not None:
        embeddings_io.save(cache_dir, kind, uids, emb, meta)
      out.append(emb)
    if out[0].shape[1] != out[1].shape[1]:
      raise embeddings_io.EmbeddingsError(
          f"query embeddings have width {out[0].shape[1]}, candidate embeddings "
          f"{out[1].shape[1]}: both must come from the same encoder")
    return out[0], out[1]

  def _read_cache(self, cache_dir: str, kind: str, meta: dict, uids: Sequence[str]):
    meta_path = os.path.join(cache_dir, f"{kind}.meta.json")
    if not os.path.isfile(meta_path):
      return None
    try:
      with open(meta_path, encoding="utf-8") as f:
        if json.load(f) != json.loads(json.dumps(meta)):
          return None
      cached_uids, emb = embeddings_io.load(cache_dir, kind)
    except (OSError, ValueError):
      return None  # a stale or damaged cache is recomputed, never trusted
    if list(cached_uids) != list(uids):
      return None
    if self.show_progress:
      print(f"reusing cached {kind} embeddings from {cache_dir}", file=sys.stderr)
    return emb

  # --- scoring -------------------------------------------------------------------------------------
  def score(self, query_emb: np.ndarray, candidate_emb: np.ndarray
            ) -> tuple[metrics_lib.PerQueryMetrics, dict]:
    """Per-query metrics of every setting and the results dict (results.json schema)."""
    col = self.collection
    query_emb = _check_embeddings(query_emb, col.num_queries, "query")
    candidate_emb = _check_embeddings(candidate_emb, col.num_candidates, "candidate")
    if query_emb.shape[1] != candidate_emb.shape[1]:
      raise embeddings_io.EmbeddingsError(
          f"query embeddings have width {query_emb.shape[1]} but candidate embeddings have "
          f"width {candidate_emb.shape[1]}; both must come from the same encoder.")
    if self.normalize:
      query_emb, candidate_emb = (embeddings_io.normalize_rows(query_emb),
                                  embeddings_io.normalize_rows(candidate_emb))
    if self.center_languages:
      # Queries and candidates separately: they carry different prefixes, so a language's
      # queries and its candidates sit around different means.
      query_emb = center_by_language(query_emb, col.query_langs)
      candidate_emb = center_by_language(candidate_emb, col.candidate_langs)
      if self.normalize:
        query_emb, candidate_emb = (embeddings_io.normalize_rows(query_emb),
                                    embeddings_io.normalize_rows(candidate_emb))
    per_query = metrics_lib.score_grid(
        query_emb, candidate_emb, col.lang_index(col.candidate_langs), len(col.languages),
        col.relevance_arrays(), mesh=self.mesh, show_progress=self.show_progress)
    results = grid_lib.summarize(col, per_query, self.language_groups())
    if self.center_languages:  # only then: a plain results.json keeps DESIGN.md's schema exactly
      results["center_languages"] = True
    return per_query, results

  def evaluate(self, embed_fn: EmbedFn, output_dir: str | None = None, *,
               passage_embed_fn: EmbedFn | None = None, cache_dir: str | None = None,
               cache_key: Mapping | None = None, header_lines: Sequence[str] = (),
               meta: dict | None = None) -> dict:
    """Encodes, scores and (with `output_dir`) writes every report file. Returns the results."""
    q_emb, c_emb = self.embed(embed_fn, cache_dir, cache_key, passage_embed_fn)
    return self.evaluate_embeddings(q_emb, c_emb, output_dir, header_lines=header_lines, meta=meta)

  def evaluate_embeddings(self, query_emb: np.ndarray, candidate_emb: np.ndarray,
                          output_dir: str | None = None, *, header_lines: Sequence[str] = (),
                          meta: dict | None = None) -> dict:
    per_query, results = self.score(query_emb, candidate_emb)
    if output_dir:
      self.write_reports(output_dir, per_query, results, header_lines, meta)
    return results

  # --- what the evaluate command line calls (search/corpus_eval.py has the same methods) --------
  def load_embeddings(self, directory: str) -> tuple[np.ndarray, np.ndarray]:
    """Precomputed embeddings (eval/embeddings_io.py format) in the collection's order."""
    col = self.collection
    return embeddings_io.load_for(directory, col.query_uids, col.candidate_uids)

  def export_embeddings(self, directory: str, query_emb: np.ndarray,
                        candidate_emb: np.ndarray) -> None:
    embeddings_io.save(directory, "queries", self.collection.query_uids, query_emb)
    embeddings_io.save(directory, "candidates", self.collection.candidate_uids, candidate_emb)

  def write_reports(self, output_dir: str, per_query: metrics_lib.PerQueryMetrics, results: dict,
                    header_lines: Sequence[str] = (), meta: dict | None = None) -> list[str]:
    return report.write_all(output_dir, self.collection, per_query, results, header_lines, meta)

  def summary_table(self, results: dict) -> str:
    return report.summary_table(results)

  def run_info(self) -> dict:
    """Evaluator-specific fields of results_meta.json (none for the grid)."""
    return {}
