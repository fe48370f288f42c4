"""Collections: counts on the real data, the skip rule, the BEIR reader, clear data errors."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import grid as grid_lib

from eval_helpers import data_dir  # tests/eval/eval_helpers.py


def _ids_per_language(dataset):
  """question ids per language read straight from the JSON files (independent of the parser)."""
  ids = {}
  for name in sorted(os.listdir(data_dir(dataset))):
    if name.endswith(".json"):
      with open(os.path.join(data_dir(dataset), name), encoding="utf-8") as f:
        root = json.load(f)
      ids[name[:-5]] = {qa["id"] for a in root["data"] for p in a["paragraphs"] for qa in p["qas"]}
  return ids


@pytest.mark.real_data
def test_xquad_counts_and_grid(xquad_scored):
  col = xquad_scored.collection
  assert (col.num_queries, col.num_candidates) == (13_090, 13_014)
  assert len(col.languages) == 11
  # Every question has one gold sentence per language: 11 relevant candidates in the pool.
  assert collections.Counter(len(r) for r in col.relevant) == {11: 13_090}
  results = grid_lib.summarize(col, xquad_scored.per_query, {"unseen": ("el", "vi")})
  assert len(results["settings"]) == 121
  assert len(results["multilingual_by_lang"]) == 11
  summary = results["summary"]
  assert summary["monolingual"]["num_settings"] == 11
  assert summary["cross_lingual"]["num_settings"] == 110
  assert summary["cross_lingual"]["num_queries"] == 110 * 1190
  assert all(s["num_queries"] == 1190 and s["num_skipped"] == 0 for s in results["settings"])
  assert summary["multilingual"]["num_queries"] == 13_090
  # Group averages: unseen = el, vi -> 2 mono settings, 2*10*2 - 2 = 38 cross settings.
  assert summary["monolingual"]["unseen/num_settings"] == 2
  assert summary["cross_lingual"]["unseen/num_settings"] == 38
  mono = {s["query_lang"]: s["map"] for s in results["settings"]
          if s["query_lang"] == s["candidate_lang"]}
  assert summary["monolingual"]["unseen/map"] == pytest.approx((mono["el"] + mono["vi"]) / 2)
  assert summary["monolingual"]["map"] == pytest.approx(np.mean(list(mono.values())))


@pytest.mark.real_data
def test_mlqa_counts_and_skipped_queries(mlqa_scored):
  col = mlqa_scored.collection
  assert (col.num_queries, col.num_candidates) == (4_199, 20_534)
  # 2-4 relevant candidates per query in the pool (README of MLQA-R: "2-4 correct answers").
  assert set(len(r) for r in col.relevant) == {2, 3, 4}
  results = grid_lib.summarize(col, mlqa_scored.per_query)
  assert len(results["settings"]) == 49
  ids = _ids_per_language("mlqa-r")
  for s in results["settings"]:
    x, y = s["query_lang"], s["candidate_lang"]
    assert s["num_queries"] == len(ids[x] & ids[y]), (x, y)
    assert s["num_skipped"] == len(ids[x] - ids[y]), (x, y)
  skipped = sum(s["num_skipped"] for s in results["settings"])
  assert skipped > 0
  assert results["summary"]["cross_lingual"]["num_skipped"] == skipped
  assert results["summary"]["monolingual"]["num_skipped"] == 0
  assert results["summary"]["multilingual"]["num_queries"] == 4_199


@pytest.mark.real_data
def test_language_subset_and_candidate_context():
  col = collection_lib.from_lareqa(data_dir("xquad-r"), ["en", "de"], candidate_context=True)
  assert col.languages == ["en", "de"]
  assert (col.num_queries, col.num_candidates) == (2 * 1190, 1180 + 1276)
  assert all(len(r) == 2 for r in col.relevant)
  # Sentence first, then the whole paragraph it comes from.
  first = col.candidate_texts[0]
  sentence_only = collection_lib.from_lareqa(data_dir("xquad-r"), ["en"]).candidate_texts[0]
  assert first.startswith(sentence_only + " ") and len(first) > 3 * len(sentence_only)


def _write_lareqa(directory, lang, paragraphs):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{lang}.json"), "w", encoding="utf-8") as f:
    json.dump({"data": [{"title": "t", "paragraphs": paragraphs}]}, f)


@pytest.mark.real_data
def test_lareqa_errors_are_clear(tmp_path):
  with pytest.raises(collection_lib.CollectionError, match=r"'xx'.*Languages present.*'ar'"):
    collection_lib.from_lareqa(data_dir("xquad-r"), ["ar", "xx"])
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "en.json").write_text("")
  with pytest.raises(collection_lib.CollectionError, match=r"en\.json: cannot read as JSON"):
    collection_lib.from_lareqa(str(empty))
  _write_lareqa(str(tmp_path / "noq"), "en", [])
  with pytest.raises(collection_lib.CollectionError, match=r"no questions in the file"):
    collection_lib.from_lareqa(str(tmp_path / "noq"))
  unreadable = tmp_path / "bin"
  unreadable.mkdir()
  (unreadable / "de.json").write_bytes(b"\xff\xfe\x00garbage")
  with pytest.raises(collection_lib.CollectionError, match=r"de\.json: cannot read"):
    collection_lib.from_lareqa(str(unreadable))
  with pytest.raises(collection_lib.CollectionError, match=r"does not exist"):
    collection_lib.from_lareqa(str(tmp_path / "nowhere"))


def write_beir(directory, corpus, queries, qrels, split="test"):
  os.makedirs(os.path.join(directory, "qrels"), exist_ok=True)
  with open(os.path.join(directory, "corpus.jsonl"), "w", encoding="utf-8") as f:
    for doc_id, title, text in corpus:
      f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
  with open(os.path.join(directory, "queries.jsonl"), "w", encoding="utf-8") as f:
    for qid, text in queries:
      f.write(json.dumps({"_id": qid, "text": text}) + "\n")
  with open(os.path.join(directory, "qrels", f"{split}.tsv"), "w", encoding="utf-8") as f:
    f.write("query-id\tcorpus-id\tscore\n")
    for qid, doc_id, score in qrels:
      f.write(f"{qid}\t{doc_id}\t{score}\n")


def test_beir_reader(tmp_path):
  write_beir(str(tmp_path / "sw"),
             corpus=[("d1", "Title", "text one"), ("d2", "", "text two"), ("d3", "T3", "three")],
             queries=[("q1", "first"), ("q2", "second"), ("q3", "no qrels"), ("q4", "only 0")],
             qrels=[("q1", "d1", 1), ("q1", "d3", 2), ("q2", "d2", 1), ("q4", "d1", 0)])
  col = collection_lib.from_beir(str(tmp_path / "sw"))
  assert col.languages == ["sw"] and not col.cross_lingual
  assert col.query_uids == ["q1", "q2", "q4"]  # q3 has no qrels: not part of the split
  assert col.candidate_texts == ["Title text one", "text two", "T3 three"]
  assert col.relevant == [[(0, 1.0), (2, 2.0)], [(1, 1.0)], []]  # q4 kept, skipped when scored


def test_beir_errors_are_clear(tmp_path):
  write_beir(str(tmp_path / "a"), [("d1", "", "x")], [("q1", "y")], [("q1", "d9", 1)])
  with pytest.raises(collection_lib.CollectionError, match=r"corpus ids missing.*'d9'"):
    collection_lib.from_beir(str(tmp_path / "a"))
  with pytest.raises(collection_lib.CollectionError, match=r"qrels file .*dev\.tsv does not exist"):
    collection_lib.from_beir(str(tmp_path / "a"), split="dev")
  (tmp_path / "a" / "corpus.jsonl").write_text("")
  with pytest.raises(collection_lib.CollectionError, match=r"corpus\.jsonl is empty"):
    collection_lib.from_beir(str(tmp_path / "a"))
  (tmp_path / "a" / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\nnot json\n')
  with pytest.raises(collection_lib.CollectionError, match=r"corpus\.jsonl:2: not a JSON object"):
    collection_lib.from_beir(str(tmp_path / "a"))
