"""TREC run files: `qid Q0 docid rank score tag`, one line per retrieved document.

The exchange format of IR evaluation: trec_eval, pytrec_eval, ranx and BEIR's tooling read it, so
a search run here can be scored, fused or compared by any of them. Written best first, ranks from
1, at most `depth` documents per query (1000 by default, trec_eval's convention). Scores carry
float32's full precision (9 significant digits), so that a reader that re-sorts by score (trec_eval
does; it breaks ties by document id, we by corpus position) sees the same order wherever the
scores differ. A path ending in .gz is compressed.
"""

from __future__ import annotations

import collections
import gzip
import io
import os
from typing import Sequence

import numpy as np

from hybrid_jax import errors

DEFAULT_DEPTH = 1000
DEFAULT_TAG = "hybrid_jax"


class TrecFormatError(errors.UserError):
  """A run file does not follow `qid Q0 docid rank score tag`."""


def _open(path: str, mode: str):
  if path.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8")
  return open(path, mode, encoding="utf-8")


def _check_field(value: str, what: str) -> None:
  if not value or any(c.isspace() for c in value):
    raise TrecFormatError(f"{what} {value!r} is empty or contains whitespace; TREC run files "
                          "separate fields by whitespace. Use ids without spaces.")


def write_run(path: str, query_ids: Sequence[str], doc_ids: Sequence[str], indices: np.ndarray,
              scores: np.ndarray, *, depth: int = DEFAULT_DEPTH, tag: str = DEFAULT_TAG) -> str:
  """Writes the run of a search: row i of indices / scores ([Q, k], best first) for query_ids[i].

  indices are positions in doc_ids; negative indices (nothing retrieved) are skipped.
  """
  indices, scores = np.asarray(indices), np.asarray(scores, np.float32)
  if indices.shape != scores.shape or indices.ndim != 2 or len(indices) != len(query_ids):
    raise ValueError(f"indices {indices.shape} and scores {scores.shape} must both be "
                     f"[{len(query_ids)} queries, k]")
  _check_field(tag, "run tag")
  for qid in query_ids:
    _check_field(qid, "query id")
  depth = min(int(depth), indices.shape[1])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp" + (".gz" if path.endswith(".gz") else "")
  checked = set()
  with _open(tmp, "w") as f:
    for qid, row, row_scores in zip(query_ids, indices[:, :depth], scores[:, :depth]):
      lines = []
      for rank, (doc, score) in enumerate(zip(row.tolist(), row_scores.tolist()), 1):
        if doc < 0:
          continue
        doc_id = doc_ids[doc]
        if doc not in checked:
          _check_field(doc_id, "document id")
          checked.add(doc)
        lines.append(f"{qid} Q0 {doc_id} {rank} {score:.9g} {tag}\n")
      f.write("".join(lines))
  os.replace(tmp, path)
  return path


def read_run(path: str) -> dict[str, dict[str, float]]:
  """{qid: {docid: score}}, the dict pytrec_eval.RelevanceEvaluator.evaluate takes."""
  run: dict[str, dict[str, float]] = collections.defaultdict(dict)
  with _open(path, "r") as f:
    for line_no, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 6:
        raise TrecFormatError(f"{path}:{line_no}: expected 6 fields `qid Q0 docid rank score "
                              f"tag`, found {len(fields)}: {line.strip()!r}")
      qid, _, doc_id, rank, score, _ = fields
      try:
        int(rank)
        run[qid][doc_id] = float(score)
      except ValueError as e:
        raise TrecFormatError(f"{path}:{line_no}: rank {rank!r} or score {score!r} is not a "
                              "number") from e
  return dict(run)
