"""BEIR at corpus scale: metrics over the full-corpus ranking equal pytrec_eval's, run files,
resume of an interrupted corpus embedding, multilingual pools, compare, clear errors."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import pytrec_eval

from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import embeddings_io
from hybrid_jax.eval import report
from hybrid_jax.eval import runner
from hybrid_jax.eval import significance
from hybrid_jax.search import beir_eval
from hybrid_jax.search import corpus_eval
from hybrid_jax.search import store as store_lib
from hybrid_jax.search import trec

# trec_eval measure -> our metric name.
TREC = {"map": "map", "ndcg_cut_10": "ndcg@10", "recall_100": "recall@100",
        "recip_rank": "mrr", "recall_1": "recall@1", "recall_10": "recall@10"}
NUM_DOCS, NUM_QUERIES, DIM = 260, 30, 12


def write_beir(directory, doc_ids, query_ids, qrels, doc_langs=None, query_langs=None):
  os.makedirs(os.path.join(directory, "qrels"), exist_ok=True)
  with open(os.path.join(directory, "corpus.jsonl"), "w", encoding="utf-8") as f:
    for i, doc_id in enumerate(doc_ids):
      row = {"_id": doc_id, "title": f"title {i}" if i % 3 else "", "text": f"passage {i}"}
      if doc_langs:
        row["metadata"] = {"lang": doc_langs[i]}
      f.write(json.dumps(row) + "\n")
  with open(os.path.join(directory, "queries.jsonl"), "w", encoding="utf-8") as f:
    for i, query_id in enumerate(query_ids):
      row = {"_id": query_id, "text": f"question {i}"}
      if query_langs:
        row["metadata"] = {"lang": query_langs[i]}
      f.write(json.dumps(row) + "\n")
  with open(os.path.join(directory, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
    f.write("query-id\tcorpus-id\tscore\n")
    f.writelines(f"{q}\t{d}\t{g}\n" for q, d, g in qrels)
  return directory


def _fixture(tmp_path, seed=0, doc_langs=None, query_langs=None):
  """A BEIR directory with graded, multi-document qrels and an embeddings directory."""
  rng = np.random.default_rng(seed)
  doc_ids = [f"doc{i}" for i in rng.permutation(NUM_DOCS)]  # corpus order != id order
  query_ids = [f"q{i}" for i in range(NUM_QUERIES)]
  qrels = []
  for i, q in enumerate(query_ids):
    for d in rng.choice(NUM_DOCS, size=1 + i % 4, replace=False):
      # The last query's documents are all judged non-relevant: trec_eval scores it 0.
      qrels.append((q, doc_ids[d], int(rng.integers(1, 3)) if i < NUM_QUERIES - 1 else 0))
  qrels.append(("q0", doc_ids[5], 0))  # judged non-relevant: not relevant
  qrels.append(("q_unused", doc_ids[3], 1))  # a qrels query missing from queries.jsonl
  beir_dir = write_beir(str(tmp_path / "beir"), doc_ids, query_ids, qrels, doc_langs, query_langs)
  while True:  # embeddings without near-ties: float32 search and float64 reference rank alike
    queries = rng.standard_normal((NUM_QUERIES, DIM)).astype(np.float32)
    docs = rng.standard_normal((NUM_DOCS, DIM)).astype(np.float32)
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    if np.diff(np.sort(scores, axis=1), axis=1).min() > 1e-5:
      break
  emb_dir = str(tmp_path / f"emb{seed}")
  embeddings_io.save(emb_dir, "queries", query_ids, queries)
  embeddings_io.save(emb_dir, "candidates", doc_ids, docs)
  return beir_dir, emb_dir, doc_ids, query_ids, qrels, queries, docs


def _options(beir_dir, emb_dir, out, **kwargs):
  return runner.RunOptions(embeddings=emb_dir, dataset="beir", data_dir=beir_dir,
                           output_dir=str(out), normalize=False, show_progress=False, **kwargs)


def _pytrec_full_ranking(doc_ids, query_ids, qrels, queries, docs):
  scores = queries.astype(np.float64) @ docs.astype(np.float64).T
  run = {q: dict(zip(doc_ids, map(float, scores[i]))) for i, q in enumerate(query_ids)}
  judged = {}
  for q, d, g in qrels:
    judged.setdefault(q, {})[d] = g
  return pytrec_eval.RelevanceEvaluator(judged, set(TREC)).evaluate(run)


def test_metrics_equal_pytrec_eval_over_the_full_corpus(tmp_path):
  beir_dir, emb_dir, doc_ids, query_ids, qrels, queries, docs = _fixture(tmp_path)
  out = tmp_path / "out"
  results = runner.run(_options(beir_dir, emb_dir, out, trec_depth=40))
  want = _pytrec_full_ranking(doc_ids, query_ids, qrels, queries, docs)
  per_query = report.read_per_query(str(out))
  assert list(per_query["query_uids"]) == query_ids
  assert list(per_query["setting_columns"]) == ["beir", "all"]
  worst = 0.0
  for measure, ours in TREC.items():
    got = per_query["metrics"][ours][:, 0]
    ref = np.array([want[q][measure] for q in query_ids])
    worst = max(worst, float(np.abs(got - ref).max()))
    np.testing.assert_allclose(per_query["metrics"][ours][:, 1], got)  # pool column = corpus
    assert results["settings"][0][ours] == pytest.approx(ref.mean(), abs=1e-6)
  assert worst <= 1e-6
  # Some relevant documents rank far below the run file's depth: MAP is the full ranking's.
  full_map = np.array([want[q]["map"] for q in query_ids])
  run = trec.read_run(str(out / "run.trec"))
  assert all(len(docs_of) == 40 for docs_of in run.values())
  truncated = pytrec_eval.RelevanceEvaluator(
      {q: {d: g for qq, d, g in qrels if qq == q} for q in query_ids},
      {"map", "ndcg_cut_10"}).evaluate(run)
  truncated_map = np.array([truncated[q]["map"] for q in query_ids])
  assert (truncated_map < full_map - 1e-3).any() and (truncated_map <= full_map + 1e-9).all()
  np.testing.assert_allclose([truncated[q]["ndcg_cut_10"] for q in query_ids],
                             per_query["metrics"]["ndcg@10"][:, 0], atol=1e-6)
  assert results["summary"]["monolingual"]["num_queries"] == NUM_QUERIES
  assert results["summary"]["cross_lingual"] is None and results["summary"]["multilingual"] is None
  assert results["corpus"]["queries_without_relevant"] == 1
  for name in ("results.json", "results.md", "settings.csv", "grid_map.png", "run.trec"):
    assert (out / name).is_file()


@pytest.mark.parametrize("as_store", [False, True])
def test_normalize_scores_precomputed_corpus_embeddings_by_cosine(tmp_path, as_store):
  beir_dir, emb_dir, doc_ids, query_ids, qrels, queries, docs = _fixture(tmp_path)
  lengths = np.random.default_rng(1).uniform(0.2, 5.0, size=(len(docs), 1)).astype(np.float32)
  if as_store:  # an unnormalised store in <embeddings>/corpus instead of candidates.npy
    os.remove(os.path.join(emb_dir, "candidates.npy"))
    rows = iter(np.asarray(docs * lengths))
    store_lib.write_store(os.path.join(emb_dir, corpus_eval.STORE_DIR),
                          [(d, d) for d in doc_ids],
                          lambda texts: np.stack([next(rows) for _ in texts]), key={"k": 1},
                          shard_size=100, normalize=False)
  else:
    embeddings_io.save(emb_dir, "candidates", doc_ids, docs * lengths)
  out = tmp_path / "out"
  options = _options(beir_dir, emb_dir, out)
  results = runner.run(dataclasses.replace(options, normalize=True))
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  want = _pytrec_full_ranking(doc_ids, query_ids, qrels, unit(queries), unit(docs))
  ref = np.mean([want[q]["ndcg_cut_10"] for q in query_ids])
  assert results["settings"][0]["ndcg@10"] == pytest.approx(ref, abs=1e-6)


def test_compare_works_on_corpus_results(tmp_path):
  beir_dir, emb_a, *_ = _fixture(tmp_path, seed=0)
  _, emb_b, *_ = _fixture(tmp_path, seed=1)
  runner.run(_options(beir_dir, emb_a, tmp_path / "a"))
  runner.run(_options(beir_dir, emb_b, tmp_path / "b"))
  rows = significance.compare(str(tmp_path / "a"), str(tmp_path / "b"), "ndcg@10",
                              num_permutations=200)
  names = [r.name for r in rows]
  assert names[0] == "monolingual" and "beir->beir" in names
  a = report.read_results_json(str(tmp_path / "a"))["summary"]["monolingual"]["ndcg@10"]
  assert rows[0].a == pytest.approx(a) and rows[0].num_queries == NUM_QUERIES


def test_multilingual_tagged_corpus_reports_each_language_against_the_pool(tmp_path):
  doc_langs = ["en", "de", "zh"] * (NUM_DOCS // 3) + ["en"] * (NUM_DOCS % 3)
  query_langs = ["de", "en"] * (NUM_QUERIES // 2)
  beir_dir, emb_dir, doc_ids, query_ids, qrels, queries, docs = _fixture(
      tmp_path, doc_langs=doc_langs, query_langs=query_langs)
  out = tmp_path / "out"
  results = runner.run(_options(beir_dir, emb_dir, out))
  want = _pytrec_full_ranking(doc_ids, query_ids, qrels, queries, docs)
  assert results["languages"] == ["de", "en"] and results["settings"] == []
  by_lang = {e["query_lang"]: e for e in results["multilingual_by_lang"]}
  for lang in ("de", "en"):
    rows = [q for q, ql in zip(query_ids, query_langs) if ql == lang]
    assert by_lang[lang]["ndcg@10"] == pytest.approx(
        np.mean([want[q]["ndcg_cut_10"] for q in rows]), abs=1e-6)
    assert by_lang[lang]["num_queries"] == len(rows)
  assert results["summary"]["multilingual"]["num_settings"] == 2
  assert "rank_distance" in results["summary"]["multilingual"]
  assert (out / "grid_map.png").is_file() and (out / "results.md").is_file()


class FlakyEmbedder:
  """embed_fn(texts, prefix): fixed vectors per text; raises on a given call (a preemption)."""

  def __init__(self, fail_on_call=None):
    self.calls, self.fail_on_call = [], fail_on_call

  def __call__(self, texts, prefix):
    if len(self.calls) == self.fail_on_call:
      raise KeyboardInterrupt("preempted")
    self.calls.append((prefix, len(texts)))
    return np.array([[len(t), t.count("1"), t.count("2"), 1.0] for t in texts], np.float32)


def test_interrupted_corpus_embedding_resumes(tmp_path):
  beir_dir, *_ = _fixture(tmp_path)
  evaluator = beir_eval.BeirEvaluator(beir_dir, show_progress=False, store_shard_size=100,
                                      query_prefix="q: ", passage_prefix="p: ")
  kwargs = dict(output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                cache_key={"model": "fake"})
  with pytest.raises(KeyboardInterrupt):  # queries, then corpus shards of 100: dies on shard 2
    evaluator.evaluate(FlakyEmbedder(fail_on_call=2), **kwargs)
  resumed = FlakyEmbedder()
  results = evaluator.evaluate(resumed, **kwargs)
  assert resumed.calls == [("p: ", 100), ("p: ", 60)]  # queries cached, shard 0 kept
  again = FlakyEmbedder()
  assert evaluator.evaluate(again, **kwargs) == results and again.calls == []
  fresh = beir_eval.BeirEvaluator(beir_dir, show_progress=False, store_shard_size=100,
                                  query_prefix="q: ", passage_prefix="p: ")
  assert fresh.evaluate(FlakyEmbedder(), output_dir=None) == results  # uncached, same numbers


def test_qrels_naming_unknown_documents_is_a_clear_error(tmp_path):
  beir_dir = write_beir(str(tmp_path / "b"), ["d1", "d2"], ["q1"], [("q1", "d1", 1),
                                                                   ("q1", "d7", 1)])
  with pytest.raises(collection_lib.CollectionError,
                     match=r"qrels/test\.tsv names 1 corpus ids missing from .*corpus\.jsonl, "
                           r"e\.g\. \['d7'\] \(judged for queries \['q1'\]\); expected every "
                           r"qrels corpus-id .* Check that qrels and corpus"):
    _ = beir_eval.BeirEvaluator(beir_dir, show_progress=False).collection


def test_embeddings_that_miss_corpus_documents_are_refused(tmp_path):
  beir_dir, emb_dir, doc_ids, *_ = _fixture(tmp_path)
  embeddings_io.save(emb_dir, "candidates", doc_ids[:-1], np.ones((NUM_DOCS - 1, DIM)))
  with pytest.raises(beir_eval.corpus_eval.CorpusEvalError,
                     match=r"hold 259 documents, .*260; 1 corpus ids have no embedding"):
    runner.run(_options(beir_dir, emb_dir, tmp_path / "out"))


def test_repeated_corpus_ids_are_refused(tmp_path):
  beir_dir = write_beir(str(tmp_path / "b"), ["d1", "d2", "d3", "d2"], ["q1"], [("q1", "d1", 1)])
  with pytest.raises(beir_eval.corpus_eval.CorpusEvalError,
                     match=r"_id 'd2' appears on two rows \(documents 2 and 4\)"):
    _ = beir_eval.BeirEvaluator(beir_dir, show_progress=False).collection
