"""BEIR-format evaluation at corpus scale (MIRACL, BEIR-NQ): exact search over the whole corpus.

A BEIR directory holds corpus.jsonl (`_id`, `title`, `text`), queries.jsonl (`_id`, `text`) and
qrels/<split>.tsv (query-id, corpus-id, score; score > 0 is relevant and the nDCG gain). Every
query is ranked against EVERY document (search/corpus_eval.py), never only against the judged
ones (which inflates scores by up to 20 points), and its metrics follow from the full-corpus
ranks of its relevant documents (eval/metrics.py `metrics_from_ranks`):
  nDCG@10, Recall@1/10/100, MRR (from the top of the ranking) and MAP over the FULL ranking (a
  relevant document ranked 5000th still counts 1/5000 * its position among the relevant).
These equal trec_eval's on a run holding the whole ranking. trec_eval on run.trec (top
`trec_depth`, 1000 by default) gives the same values except MAP, which it truncates at the depth.
Ties follow the search: equal scores rank by corpus position (trec_eval breaks them by
document id, in reverse), so with tied scores the two can differ.

Languages: MIRACL-style directories are one language, named by --languages or the directory, and
reported as the X->X setting. Rows may carry a language tag (`metadata.lang`, as
search/convert_lareqa.py writes for XQuAD-R + MLQA-R); with several languages the corpus is a
multilingual pool and each query language is reported as X->all (with rank distance).
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import grid as grid_lib
from hybrid_jax.eval import grid_evaluator
from hybrid_jax.eval import metrics as metrics_lib
from hybrid_jax.search import corpus_eval

# Recall@100 needs at least the top 100, whatever the run file's depth.
_MIN_SEARCH_DEPTH = max(metrics_lib.RECALL_CUTOFFS + (metrics_lib.NDCG_CUTOFF,))


class BeirEvaluator(corpus_eval.CorpusEvaluator):
  """A BEIR-format directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""

  type_name = "beir"

  def __init__(self, data_dir: str, split: str = "test", lang: str | None = None,
               name: str | None = None, **kwargs):
    super().__init__(**kwargs)
    if not data_dir:
      raise grid_evaluator.EvaluatorConfigError(
          "BeirEvaluator needs data_dir (a directory with corpus.jsonl, queries.jsonl and "
          "qrels/<split>.tsv)")
    self.data_dir, self.split, self.lang = data_dir, split, lang
    self.name = name or os.path.basename(os.path.normpath(data_dir))
    self.relevant: list[dict[str, float]] = []  # per query: corpus id -> gain (> 0)

  @classmethod
  def from_spec(cls, name: str, spec: Mapping, **common) -> "BeirEvaluator":
    return cls(spec.get("data_dir", ""), spec.get("split", "test"), spec.get("lang") or None,
               name, **common, **cls.common_spec_options(spec))

  def _load_collection(self) -> corpus_eval.CorpusQueries:
    corpus_path = os.path.join(self.data_dir, "corpus.jsonl")
    qrels_path = os.path.join(self.data_dir, "qrels", f"{self.split}.tsv")
    doc_ids, doc_langs = corpus_eval.read_corpus_ids(corpus_path)
    qrels = collection_lib.read_qrels(qrels_path)
    collection_lib.check_qrels_documents(qrels, set(doc_ids), qrels_path, corpus_path)
    label = self.lang or os.path.basename(os.path.normpath(self.data_dir))
    queries = [row for _, row in collection_lib.iter_jsonl(
        os.path.join(self.data_dir, "queries.jsonl"), ("_id", "text"))
               if str(row["_id"]) in qrels]
    if not queries:
      raise collection_lib.CollectionError(
          f"{self.data_dir}: none of the queries in queries.jsonl appears in {qrels_path}; "
          "expected qrels query-ids to be queries.jsonl _ids. Do the ids match?")
    query_langs = [corpus_eval.tagged_language(q) or label for q in queries]
    languages = list(dict.fromkeys(query_langs))
    self.relevant = [{d: g for d, g in qrels[str(q["_id"])].items() if g > 0} for q in queries]
    return corpus_eval.CorpusQueries(
        name=self.name, languages=languages, query_uids=[str(q["_id"]) for q in queries],
        query_texts=[q["text"] for q in queries], query_langs=query_langs,
        candidate_uids=doc_ids, corpus_path=corpus_path,
        cross_lingual=len(languages) > 1 or len(doc_langs) > 1)

  def score(self, query_emb: np.ndarray, corpus):
    """Per-query metrics over the full-corpus ranking and the results dict."""
    col = self.collection
    judged = {doc_id for relevant in self.relevant for doc_id in relevant}
    position = {doc_id: i for i, doc_id in enumerate(corpus.ids) if doc_id in judged}
    width = max([len(r) for r in self.relevant] + [1])
    targets = np.full((col.num_queries, width), -1, np.int64)
    gains = np.zeros((col.num_queries, width), np.float32)
    for i, relevant in enumerate(self.relevant):
      for j, (doc_id, gain) in enumerate(sorted(relevant.items(), key=lambda x: position[x[0]])):
        targets[i, j], gains[i, j] = position[doc_id], gain
    result = self.search(query_emb, corpus, max(self.trec_depth, _MIN_SEARCH_DEPTH), targets)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      metrics = jax.tree.map(np.asarray, metrics_lib.metrics_from_ranks(
          jnp.asarray(result.target_ranks, jnp.int32), jnp.asarray(targets >= 0),
          jnp.asarray(gains)))

    # Setting columns (eval/grid.py): query languages, then the pool. The corpus is the pool;
    # a monolingual directory also fills its one language's X->X column.
    num_langs = len(col.languages)
    columns = [num_langs] if col.cross_lingual else [0, num_langs]
    # A query whose qrels judge nothing relevant (all grades 0) scores 0 on every metric, as in
    # trec_eval / pytrec_eval and BEIR's means (leaving it out would raise the averages).
    unjudged = metrics["num_relevant"] == 0
    values = {}
    for name in metrics_lib.METRICS:
      values[name] = np.full((col.num_queries, num_langs + 1), np.nan, np.float32)
      values[name][:, columns] = np.where(unjudged, 0.0, metrics[name])[:, None]
    num_relevant = np.zeros((col.num_queries, num_langs + 1), np.int32)
    best_rank = np.zeros_like(num_relevant)
    num_relevant[:, columns] = metrics["num_relevant"][:, None]
    best_rank[:, columns] = metrics["best_rank"][:, None]
    per_query = metrics_lib.PerQueryMetrics(values=values, num_relevant=num_relevant,
                                            rank_distance=metrics["rank_distance"],
                                            best_rank=best_rank)
    results = grid_lib.summarize(col, per_query, self.language_groups(),
                                 pool_only=col.cross_lingual)
    results["corpus"] = {"num_documents": corpus.shape[0], "split": self.split,
                         "search_depth": int(result.indices.shape[1]),
                         "queries_without_relevant": int(unjudged.sum()),
                         "map": "full ranking (trec_eval on run.trec truncates at its depth)"}
    self.last_run = (col.query_uids, corpus.ids, result.indices, result.scores)
    return per_query, results
