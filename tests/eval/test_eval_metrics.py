"""Grid metrics against trec_eval (pytrec_eval) on the real data, ties, rank distance, sharding."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import pytrec_eval
from jax.sharding import Mesh

from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import grid as grid_lib
from hybrid_jax.eval import metrics as metrics_lib

# trec_eval measure -> our metric name.
TREC = {"map": "map", "ndcg_cut_10": "ndcg@10", "recall_100": "recall@100",
        "recip_rank": "mrr", "recall_1": "recall@1", "recall_10": "recall@10"}


def _trec_eval(scored, query_lang, candidate_lang, max_queries, seed=0):
  """pytrec_eval per-query values of one setting, on (a sample of) its queries."""
  col = scored.collection
  langs = np.array(col.query_langs)
  cand_langs = np.array(col.candidate_langs)
  rows = np.flatnonzero(langs == query_lang)
  if len(rows) > max_queries:
    rows = np.sort(np.random.default_rng(seed).choice(rows, max_queries, replace=False))
  cands = np.arange(col.num_candidates) if candidate_lang == grid_lib.POOL else np.flatnonzero(
      cand_langs == candidate_lang)
  in_setting = set(cands.tolist())
  scores = scored.scores(rows)[:, cands]
  qrels, run, skipped = {}, {}, []
  for i, row in enumerate(rows):
    rel = {str(c): 1 for c, _ in col.relevant[row] if c in in_setting}
    if not rel:
      skipped.append(row)
      continue
    qrels[str(row)] = rel
    run[str(row)] = dict(zip(map(str, cands.tolist()), scores[i].tolist()))
  evaluator = pytrec_eval.RelevanceEvaluator(qrels, set(TREC))
  return evaluator.evaluate(run), skipped


# Settings checked query by query (the full grid is scored; trec_eval on every setting would
# take minutes). They cover X->X, X->Y, a setting with skipped queries and the pool.
CASES = [
    ("xquad", "en", "en", 1190), ("xquad", "de", "zh", 1190), ("xquad", "th", "all", 150),
    ("mlqa", "zh", "zh", 504), ("mlqa", "ar", "de", 517), ("mlqa", "hi", "all", 120),
]


@pytest.mark.real_data
@pytest.mark.parametrize("dataset,query_lang,candidate_lang,max_queries", CASES)
def test_per_query_metrics_match_trec_eval(dataset, query_lang, candidate_lang, max_queries,
                                           request):
  scored = request.getfixturevalue(f"{dataset}_scored")
  col = scored.collection
  trec, skipped = _trec_eval(scored, query_lang, candidate_lang, max_queries)
  column = grid_lib.setting_columns(col).index(candidate_lang)
  values = scored.per_query.values
  worst = 0.0
  for row_text, measures in trec.items():
    row = int(row_text)
    for trec_name, ours in TREC.items():
      worst = max(worst, abs(measures[trec_name] - float(values[ours][row, column])))
  assert worst <= 1e-6, (dataset, query_lang, candidate_lang, worst)
  for row in skipped:  # no relevant candidate in the setting: skipped, never scored as 0
    assert np.isnan(values["map"][row, column])
  assert len(trec) + len(skipped) == min(max_queries, np.sum(np.array(col.query_langs) == query_lang))
  # Averages over the checked queries agree too (and are far from trivial values).
  mean_trec = np.mean([m["map"] for m in trec.values()])
  mean_ours = np.mean([values["map"][int(r), column] for r in trec])
  assert abs(mean_trec - mean_ours) <= 1e-6 and 0.02 < mean_ours < 0.98


@pytest.mark.real_data
def test_setting_means_match_trec_eval_means(xquad_scored):
  """results.json setting entries = mean over the setting's queries of trec_eval's values."""
  results = grid_lib.summarize(xquad_scored.collection, xquad_scored.per_query)
  entry = next(s for s in results["settings"]
               if s["query_lang"] == "de" and s["candidate_lang"] == "zh")
  trec, _ = _trec_eval(xquad_scored, "de", "zh", 1190)
  for trec_name, ours in (("map", "map"), ("recall_1", "recall@1"), ("recall_10", "recall@10")):
    assert abs(entry[ours] - np.mean([m[trec_name] for m in trec.values()])) <= 1e-6
  assert entry["num_queries"] == 1190 and entry["num_skipped"] == 0


def _tiny_collection(scores_per_query, relevant, query_langs, cand_langs, languages):
  """Collection + 1-D-score embeddings: query i's score of candidate c is scores[i][c]."""
  num_q, num_c = len(scores_per_query), len(cand_langs)
  col = collection_lib.Collection(
      name="tiny", languages=languages, query_uids=[f"q{i}" for i in range(num_q)],
      query_texts=[""] * num_q, query_langs=query_langs,
      candidate_uids=[f"c{i}" for i in range(num_c)], candidate_texts=[""] * num_c,
      candidate_langs=cand_langs, relevant=[[(c, 1.0) for c in r] for r in relevant])
  # One-hot queries over num_q dims; candidate c's dim i holds query i's score of c.
  q = np.eye(num_q, dtype=np.float32)
  c = np.asarray(scores_per_query, np.float32).T.copy()
  return col, q, c


def _score(col, q, c, **kw):
  return metrics_lib.score_grid(q, c, col.lang_index(col.candidate_langs), len(col.languages),
                                col.relevance_arrays(), show_progress=False, **kw)


def test_rank_distance_hand_built_mlqa_like():
  """Ids with 2, 3 and 4 relevant candidates (one per language), as in MLQA-R."""
  langs = ["ar", "de", "en", "es"]
  # 12 candidates, 3 per language: ar 0-2, de 3-5, en 6-8, es 9-11.
  cand_langs = [lang for lang in langs for _ in range(3)]
  # Pool ranks are given by descending score; each row lists a score per candidate.
  order_q0 = [6, 0, 1, 2, 3, 9, 4, 5, 7, 8, 10, 11]  # relevant {6, 3}: ranks 1 and 5
  order_q1 = [1, 2, 0, 3, 6, 9, 4, 5, 7, 8, 10, 11]  # relevant {0, 4, 7}: ranks 3, 7, 9
  order_q2 = [11, 8, 0, 1, 2, 3, 4, 5, 6, 7, 9, 10]  # relevant {2, 5, 8, 11}: ranks 5, 8, 2, 1
  scores = []
  for order in (order_q0, order_q1, order_q2):
    s = np.zeros(12)
    s[order] = np.arange(12, 0, -1)
    scores.append(s)
  relevant = [[6, 3], [0, 4, 7], [2, 5, 8, 11]]
  col, q, c = _tiny_collection(scores, relevant, ["en", "ar", "es"], cand_langs, langs)
  pq = _score(col, q, c)
  np.testing.assert_array_equal(pq.rank_distance, [5 - 1, 9 - 3, 8 - 1])
  pool = len(langs)
  np.testing.assert_array_equal(pq.num_relevant[:, pool], [2, 3, 4])
  # Pool AP by hand: q0 ranks {1,5}: (1/1 + 2/5)/2; q1 {3,7,9}: (1/3+2/7+3/9)/3;
  # q2 {1,2,5,8}: (1+1+3/5+4/8)/4.
  np.testing.assert_allclose(pq.values["map"][:, pool],
                             [(1 + 2 / 5) / 2, (1 / 3 + 2 / 7 + 3 / 9) / 3, (2 + 3 / 5 + 4 / 8) / 4],
                             rtol=1e-6)
  # Within a language: q1's relevant de candidate 4 ranks 2nd among de (3, 4, 5 scored 3 > 4 > 5).
  assert pq.values["mrr"][1, langs.index("de")] == pytest.approx(1 / 2)
  # es candidates 9..11 for q0: no relevant there -> skipped (NaN), counted as such.
  assert np.isnan(pq.values["map"][0, langs.index("es")])
  results = grid_lib.summarize(col, pq)
  by_lang = {e["query_lang"]: e["rank_distance"] for e in results["multilingual_by_lang"]}
  assert by_lang == {"ar": 6.0, "en": 4.0, "es": 7.0}
  assert results["summary"]["multilingual"]["rank_distance"] == pytest.approx((6 + 4 + 7) / 3)
  en_es = next(s for s in results["settings"] if s["query_lang"] == "en" and s["candidate_lang"] == "es")
  assert en_es["num_queries"] == 0 and en_es["num_skipped"] == 1


def test_rank_distance_mean_per_language_then_macro():
  langs = ["a", "b"]
  cand_langs = ["a", "a", "b", "b"]
  # q0 (lang a) relevant {0, 2} ranks 1 and 4; q1 (lang a) relevant {0, 2} ranks 1, 2;
  # q2 (lang b) relevant {1, 3} ranks 2, 3.
  scores = [[4, 3, 1, 2], [4, 1, 3, 2], [4, 3, 1, 2]]
  col, q, c = _tiny_collection(scores, [[0, 2], [0, 2], [1, 3]], ["a", "a", "b"], cand_langs, langs)
  results = grid_lib.summarize(col, _score(col, q, c))
  by_lang = {e["query_lang"]: e["rank_distance"] for e in results["multilingual_by_lang"]}
  assert by_lang == {"a": (3 + 1) / 2, "b": 1.0}
  assert results["summary"]["multilingual"]["rank_distance"] == pytest.approx((2.0 + 1.0) / 2)
  # Micro vs macro mAP over the pool differ when languages have different query counts.
  pool_ap = [(1 + 2 / 4) / 2, 1.0, (1 / 2 + 2 / 3) / 2]
  assert results["summary"]["multilingual"]["map_micro"] == pytest.approx(np.mean(pool_ap))
  assert results["summary"]["multilingual"]["map"] == pytest.approx(
      (np.mean(pool_ap[:2]) + pool_ap[2]) / 2)


def test_ties_are_broken_against_relevant_candidates():
  """A collapsed encoder (all scores equal) gets the worst ranks, never perfect ones."""
  n_per_lang, langs = 5, ["a", "b"]
  cand_langs = ["a"] * n_per_lang + ["b"] * n_per_lang
  scores = np.zeros((2, 2 * n_per_lang))
  relevant = [[0, 5], [1, 2, 7]]
  col, q, c = _tiny_collection(scores, relevant, ["a", "b"], cand_langs, langs)
  pq = _score(col, q, c)
  n = 2 * n_per_lang
  # Pool, R relevant among n all tied: ranks n-R+1..n.
  for i, r in enumerate(relevant):
    k = len(r)
    expected = np.mean([(j + 1) / (n - k + 1 + j) for j in range(k)])
    assert pq.values["map"][i, 2] == pytest.approx(expected)
    assert pq.rank_distance[i] == k - 1
  # Language b for query 0: 1 relevant among 5 tied -> rank 5.
  assert pq.values["mrr"][0, 1] == pytest.approx(1 / 5)
  assert pq.values["recall@1"][1, 0] == 0.0


@pytest.mark.real_data
def test_sharded_and_chunked_scoring_match_single_device(mlqa_scored):
  """8-device mesh with default chunks vs 1 device with tiny chunks: identical per-query values."""
  col = mlqa_scored.collection
  rows = np.arange(0, col.num_queries, 7)  # a sample keeps this test fast
  sub = collection_lib.Collection(
      name="sub", languages=col.languages, query_uids=[col.query_uids[i] for i in rows],
      query_texts=[""] * len(rows), query_langs=[col.query_langs[i] for i in rows],
      candidate_uids=col.candidate_uids, candidate_texts=col.candidate_texts,
      candidate_langs=col.candidate_langs, relevant=[col.relevant[i] for i in rows])
  one = Mesh(np.array(jax.devices()[:1]), ("data",))
  small = _score(sub, mlqa_scored.query_emb[rows], mlqa_scored.candidate_emb, mesh=one,
                 query_chunk=24, candidate_chunk=512)
  assert jax.device_count() == 8
  # Ranks are integers and must agree exactly; metric values up to float32 summation order.
  np.testing.assert_array_equal(small.best_rank, mlqa_scored.per_query.best_rank[rows])
  np.testing.assert_array_equal(small.rank_distance, mlqa_scored.per_query.rank_distance[rows])
  np.testing.assert_array_equal(small.num_relevant, mlqa_scored.per_query.num_relevant[rows])
  for name in metrics_lib.METRICS:
    np.testing.assert_allclose(small.values[name], mlqa_scored.per_query.values[name][rows],
                               rtol=0, atol=3e-7)


def test_graded_gains_ndcg_matches_trec_eval():
  rng = np.random.default_rng(3)
  num_q, num_c = 6, 40
  scores = rng.permutation(num_q * num_c).reshape(num_q, num_c).astype(np.float64)
  relevant, gains = [], []
  for i in range(num_q):
    picks = rng.choice(num_c, 5, replace=False)
    relevant.append(picks.tolist())
    gains.append(rng.integers(1, 4, 5).tolist())
  col, q, c = _tiny_collection(scores, relevant, ["x"] * num_q, ["x"] * num_c, ["x"])
  col = collection_lib.Collection(**{**col.__dict__, "relevant": [
      list(zip(r, map(float, g))) for r, g in zip(relevant, gains)]})
  pq = _score(col, q, c)
  qrels = {str(i): {str(cc): int(g) for cc, g in zip(relevant[i], gains[i])} for i in range(num_q)}
  run = {str(i): {str(cc): float(scores[i, cc]) for cc in range(num_c)} for i in range(num_q)}
  trec = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "map"}).evaluate(run)
  for i in range(num_q):
    assert abs(trec[str(i)]["ndcg_cut_10"] - pq.values["ndcg@10"][i, 0]) <= 1e-6
    assert abs(trec[str(i)]["map"] - pq.values["map"][i, 0]) <= 1e-6
