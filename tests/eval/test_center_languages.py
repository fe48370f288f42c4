"""Per-language mean centring (`--center_languages`): exact against NumPy, and what it is for.

1. On a small random collection the centred per-query metrics equal an independent NumPy
   computation: normalise, subtract each language's mean query / candidate row, normalise, rank
   every candidate by inner product, average precision and rank distance from the ranks.
2. A planted per-language offset (every text of a language shares one direction) makes the
   multilingual pool prefer same-language candidates; centring removes it.
3. The evaluate command records the option (results.json, results_meta.json, its own default
   output directory) and refuses it for the corpus-scale datasets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import embeddings_io
from hybrid_jax.eval import grid_evaluator
from hybrid_jax.eval import runner

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LANGS = ["en", "de", "zh"]
QUESTIONS = 7


def parallel_collection() -> collection_lib.Collection:
  """Every question in every language, one gold sentence per (question, language), relevant to
  the question's queries in all languages; plus one unanswering sentence per language."""
  cands = [(i, lang) for i in range(QUESTIONS) for lang in LANGS] + [(-1, lang) for lang in LANGS]
  index = {c: k for k, c in enumerate(cands)}
  queries = [(i, lang) for lang in LANGS for i in range(QUESTIONS)]
  return collection_lib.Collection(
      name="parallel", languages=LANGS,
      query_uids=[f"q{i}_{lang}" for i, lang in queries],
      query_texts=[f"question {i}" for i, _ in queries],
      query_langs=[lang for _, lang in queries],
      candidate_uids=[f"{lang}_{i + 2}_0" for i, lang in cands],
      candidate_texts=[f"answer {i}" for i, _ in cands],
      candidate_langs=[lang for _, lang in cands],
      relevant=[[(index[i, y], 1.0) for y in LANGS] for i, _ in queries])


def unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_centered(emb, langs):
  emb = unit(np.asarray(emb, np.float64))
  langs = np.asarray(langs)
  out = emb.copy()
  for lang in set(langs):
    out[langs == lang] -= emb[langs == lang].mean(axis=0)
  return unit(out)


def numpy_pool_metrics(q, c, relevant):
  """AP over the full pool ranking and rank distance (max - min rank of the relevant), per query."""
  scores = q @ c.T
  ap, distance = [], []
  for i, rel in enumerate(relevant):
    order = np.argsort(-scores[i], kind="stable")
    ranks = np.sort(np.nonzero(np.isin(order, [r for r, _ in rel]))[0] + 1)  # 1-based
    ap.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    distance.append(ranks[-1] - ranks[0])
  return np.array(ap), np.array(distance)


def test_centred_scores_equal_an_independent_numpy_computation():
  col = parallel_collection()
  rng = np.random.default_rng(0)
  offsets = {lang: rng.normal(0, 0.6, 24) for lang in LANGS}
  topics = rng.normal(size=(QUESTIONS + 1, 24))
  q = np.stack([topics[int(u[1:].split("_")[0])] + offsets[lang] + rng.normal(0, 0.8, 24)
                for u, lang in zip(col.query_uids, col.query_langs)])
  c = np.stack([topics[int(u.split("_")[1]) - 2] + offsets[lang] + rng.normal(0, 0.8, 24)
                for u, lang in zip(col.candidate_uids, col.candidate_langs)])
  evaluator = grid_evaluator.GridEvaluator(col, center_languages=True, show_progress=False)
  per_query, results = evaluator.score(q.astype(np.float32), c.astype(np.float32))
  qc, cc = numpy_centered(q, col.query_langs), numpy_centered(c, col.candidate_langs)
  ap, distance = numpy_pool_metrics(qc, cc, col.relevant)
  pool = len(LANGS)  # setting columns: en, de, zh, all
  np.testing.assert_allclose(per_query.values["map"][:, pool], ap, atol=1e-6)
  np.testing.assert_array_equal(per_query.rank_distance, distance)
  assert results["center_languages"] is True
  assert results["summary"]["multilingual"]["map"] == pytest.approx(
      np.mean([ap[np.array(col.query_langs) == x].mean() for x in LANGS]), abs=1e-6)
  # X->Y: the one relevant candidate in Y; AP = 1 / its rank among Y's candidates.
  cand_langs = np.array(col.candidate_langs)
  for j, y in enumerate(LANGS):
    in_y = np.nonzero(cand_langs == y)[0]
    for i, rel in enumerate(col.relevant):
      gold = [r for r, _ in rel if cand_langs[r] == y][0]
      scores = cc[in_y] @ qc[i]  # one product, so the gold's score is the same number in both
      rank = 1 + np.sum(scores > scores[list(in_y).index(gold)])
      assert per_query.values["map"][i, j] == pytest.approx(1 / rank, abs=1e-6)
  # Not a no-op: the uncentred scores differ.
  plain, plain_results = grid_evaluator.GridEvaluator(col, show_progress=False).score(
      q.astype(np.float32), c.astype(np.float32))
  assert "center_languages" not in plain_results  # DESIGN.md's schema, unchanged
  assert not np.allclose(plain.values["map"][:, pool], ap, atol=1e-3)


def test_centring_removes_a_planted_language_offset():
  """Each text = its question's one-hot + 2 x its language's one-hot (+ noise 0.05): uncentred,
  a query's own-language wrong answers outscore its other-language right ones."""
  col = parallel_collection()
  rng = np.random.default_rng(1)
  dim = QUESTIONS + 1 + len(LANGS)

  def embed(topic, lang):
    v = np.zeros(dim)
    v[topic] = 1.0
    v[QUESTIONS + 1 + LANGS.index(lang)] = 2.0
    return v + rng.normal(0, 0.05, dim)

  q = np.stack([embed(int(u[1:].split("_")[0]), lang)
                for u, lang in zip(col.query_uids, col.query_langs)]).astype(np.float32)
  c = np.stack([embed(int(u.split("_")[1]) - 2, lang)
                for u, lang in zip(col.candidate_uids, col.candidate_langs)]).astype(np.float32)
  summaries = {}
  for center in (False, True):
    evaluator = grid_evaluator.GridEvaluator(col, center_languages=center, show_progress=False)
    summaries[center] = evaluator.score(q, c)[1]["summary"]["multilingual"]
  plain, centred = summaries[False], summaries[True]
  print(f"multilingual mAP {plain['map']:.3f} -> {centred['map']:.3f}, rank distance "
        f"{plain['rank_distance']:.1f} -> {centred['rank_distance']:.1f}")
  # Uncentred: the 3 relevant candidates are split by the 6 other same-language sentences.
  assert summaries[False]["map"] < 0.8 and summaries[False]["rank_distance"] >= 7
  # Centred: the three relevant candidates take ranks 1-3 (rank distance 2, AP 1).
  assert summaries[True]["map"] == pytest.approx(1.0, abs=1e-6)
  assert summaries[True]["rank_distance"] == pytest.approx(2.0)


def test_center_by_language_subtracts_each_languages_mean():
  emb = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [5.0, 5.0]], np.float32)
  out = grid_evaluator.center_by_language(emb, ["en", "en", "de", "en"])
  np.testing.assert_allclose(out, [[-2, -1.6667], [0, 0.3333], [0, 0], [2, 1.3333]], atol=1e-4)


def test_evaluate_records_center_languages_and_keeps_its_own_output(tmp_path):
  opts = runner.RunOptions(dataset="synthetic", embeddings=str(tmp_path / "emb"),
                           show_progress=False)
  col = runner.make_evaluator(opts).collection
  rng = np.random.default_rng(0)
  embeddings_io.save(str(tmp_path / "emb"), "queries", col.query_uids,
                     rng.normal(size=(col.num_queries, 16)).astype(np.float32))
  embeddings_io.save(str(tmp_path / "emb"), "candidates", col.candidate_uids,
                     rng.normal(size=(col.num_candidates, 16)).astype(np.float32))
  out = tmp_path / "centred"
  result = subprocess.run(
      [sys.executable, "-m", "hybrid_jax.evaluate", "--dataset=synthetic",
       f"--embeddings={tmp_path / 'emb'}", f"--output_dir={out}", "--center_languages"],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  with open(out / "results.json", encoding="utf-8") as f:
    assert json.load(f)["center_languages"] is True
  with open(out / "results_meta.json", encoding="utf-8") as f:
    assert json.load(f)["center_languages"] is True
  with open(out / "results.md", encoding="utf-8") as f:
    assert "centred per language" in f.read()
  plain = runner.run(opts.__class__(**{**opts.__dict__, "output_dir": str(tmp_path / "plain")}))
  assert "center_languages" not in plain
  with open(tmp_path / "plain" / "results_meta.json", encoding="utf-8") as f:
    assert json.load(f)["center_languages"] is False
  centred = runner.RunOptions(dataset="xquad-r", model="m", center_languages=True)
  assert runner.default_output_dir(centred).endswith("xquad-r-centered")
  with pytest.raises(runner.EvaluateUsageError, match="corpus-scale search streams"):
    runner.run(runner.RunOptions(dataset="beir", data_dir=str(tmp_path), embeddings=str(tmp_path),
                                 center_languages=True, show_progress=False))
