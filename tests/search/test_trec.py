"""search.trec: run files that pytrec_eval reads and scores as the in-memory run."""

from __future__ import annotations

import numpy as np
import pytest
import pytrec_eval

from hybrid_jax.search import trec


@pytest.mark.parametrize("name", ["run.trec", "run.trec.gz"])
def test_run_file_roundtrip_and_pytrec_eval(tmp_path, name):
  doc_ids = [f"doc{i}" for i in range(6)]
  indices = np.array([[3, 1, 4, 0], [5, 2, 0, 1]])
  scores = np.array([[0.912345678, 0.5, 0.25, -1e-7], [3.0, 2.0, 1.0, 0.0]], np.float32)
  path = trec.write_run(str(tmp_path / name), ["q1", "q2"], doc_ids, indices, scores, depth=3,
                        tag="exp")
  run = trec.read_run(path)
  assert run == {"q1": {"doc3": 0.912345707, "doc1": 0.5, "doc4": 0.25},
                 "q2": {"doc5": 3.0, "doc2": 2.0, "doc0": 1.0}}
  assert np.float32(run["q1"]["doc3"]) == scores[0, 0]  # float32 survives the text round trip
  if not name.endswith(".gz"):
    lines = open(path, encoding="utf-8").read().splitlines()
    assert lines[0] == "q1 Q0 doc3 1 0.912345707 exp"  # float32's 9 significant digits
  qrels = {"q1": {"doc1": 1, "doc0": 1}, "q2": {"doc2": 2}}
  measures = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "map"}).evaluate(run)
  assert measures["q1"]["recip_rank"] == pytest.approx(0.5)
  assert measures["q1"]["map"] == pytest.approx(0.25)  # (1/2) / 2 relevant; doc0 not retrieved
  assert measures["q2"]["recip_rank"] == pytest.approx(0.5)


def test_run_file_errors(tmp_path):
  with pytest.raises(trec.TrecFormatError, match="query id 'a b'"):
    trec.write_run(str(tmp_path / "r"), ["a b"], ["d"], np.zeros((1, 1), int), np.zeros((1, 1)))
  (tmp_path / "bad").write_text("q1 Q0 d1 1 0.5\n")
  with pytest.raises(trec.TrecFormatError, match=r"bad:1: expected 6 fields"):
    trec.read_run(str(tmp_path / "bad"))
