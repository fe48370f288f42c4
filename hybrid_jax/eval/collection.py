"""Evaluation collections: queries, candidates and relevance, from LAReQA or BEIR-format files.

A collection is what the grid is computed on: queries (uid, text, language), candidates (uid,
text, language) and, for each query, its relevant candidates with a gain. LAReQA (XQuAD-R,
MLQA-R): a candidate is relevant to every query with the same question id, in every language
(DESIGN.md, "Evaluation grid"); uids follow lareqa.py. BEIR format (MIRACL-style monolingual
sets): `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`; a qrels score > 0 is relevant and is
the nDCG gain.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from hybrid_jax import errors
from hybrid_jax.data import lareqa
from hybrid_jax.data import text_files
from hybrid_jax.eval import metrics as metrics_lib


class CollectionError(errors.UserError):
  """Evaluation data is missing, unreadable or inconsistent."""


class QueryCounts:
  """num_queries / num_candidates of anything with query_uids and candidate_uids (a Collection,
  search/corpus_eval.py's CorpusQueries)."""

  @property
  def num_queries(self) -> int:
    return len(self.query_uids)

  @property
  def num_candidates(self) -> int:
    return len(self.candidate_uids)


@dataclasses.dataclass(frozen=True)
class Collection(QueryCounts):
  """Queries, candidates and relevance of one evaluation set.

  relevant[i] lists (candidate index, gain) pairs for query i; candidates of every language form
  the pool. `cross_lingual` is False for sets whose languages share no relevance (BEIR), where
  only the X->X settings are meaningful.
  """
  name: str
  languages: list[str]  # candidate/query language codes, in report order
  query_uids: list[str]
  query_texts: list[str]
  query_langs: list[str]
  candidate_uids: list[str]
  candidate_texts: list[str]
  candidate_langs: list[str]
  relevant: list[list[tuple[int, float]]]
  cross_lingual: bool = True

  def __post_init__(self):
    nq, nc = len(self.query_uids), len(self.candidate_uids)
    for name, seq, n in (("query_texts", self.query_texts, nq), ("query_langs", self.query_langs, nq),
                         ("relevant", self.relevant, nq),
                         ("candidate_texts", self.candidate_texts, nc),
                         ("candidate_langs", self.candidate_langs, nc)):
      if len(seq) != n:
        raise CollectionError(f"collection {self.name!r}: {name} has {len(seq)} entries, "
                              f"expected {n}")
    for kind, uids in (("query", self.query_uids), ("candidate", self.candidate_uids)):
      if len(set(uids)) != len(uids):
        dup = [u for u, c in collections.Counter(uids).items() if c > 1][:5]
        raise CollectionError(f"collection {self.name!r}: duplicate {kind} uids, e.g. {dup}")
    unknown = (set(self.query_langs) | set(self.candidate_langs)) - set(self.languages)
    if unknown:
      raise CollectionError(f"collection {self.name!r}: languages {sorted(unknown)} are not in "
                            f"its language list {self.languages}")

  def lang_index(self, langs: Sequence[str]) -> np.ndarray:
    position = {lang: i for i, lang in enumerate(self.languages)}
    return np.array([position[lang] for lang in langs], np.int32)

  def relevance_arrays(self) -> metrics_lib.RelevanceArrays:
    """Relevant candidates as padded [Q, R] arrays (R = most relevant candidates of a query)."""
    width = max([len(r) for r in self.relevant] + [1])
    index = np.full((self.num_queries, width), -1, np.int32)
    gain = np.zeros((self.num_queries, width), np.float32)
    for i, rel in enumerate(self.relevant):
      for j, (c, g) in enumerate(rel):
        index[i, j], gain[i, j] = c, g
    return metrics_lib.RelevanceArrays(cand_index=index, gain=gain)

  def subset_languages(self, languages: Sequence[str]) -> "Collection":
    """The same collection restricted to some languages (queries and candidates)."""
    keep_c = [i for i, lang in enumerate(self.candidate_langs) if lang in languages]
    new_c = {old: new for new, old in enumerate(keep_c)}
    keep_q = [i for i, lang in enumerate(self.query_langs) if lang in languages]
    return Collection(
        name=self.name, languages=[lang for lang in self.languages if lang in languages],
        query_uids=[self.query_uids[i] for i in keep_q],
        query_texts=[self.query_texts[i] for i in keep_q],
        query_langs=[self.query_langs[i] for i in keep_q],
        candidate_uids=[self.candidate_uids[i] for i in keep_c],
        candidate_texts=[self.candidate_texts[i] for i in keep_c],
        candidate_langs=[self.candidate_langs[i] for i in keep_c],
        relevant=[[(new_c[c], g) for c, g in self.relevant[i] if c in new_c] for i in keep_q],
        cross_lingual=self.cross_lingual)


def from_lareqa(data_dir: str, languages: Iterable[str] | None = None, *,
                candidate_context: bool = False, name: str | None = None,
                part: str = "all", heldout: lareqa.HeldoutSplit | None = None) -> Collection:
  """XQuAD-R / MLQA-R: one `<lang>.json` per language (all files in `data_dir` by default).

  part "test" (or "train") with a held-out split: only that part's questions, and only the
  sentences of its articles as candidates (lareqa.HeldoutSplit)."""
  try:
    parsed = lareqa.read_part(data_dir, list(languages) if languages else None, heldout, part)
  except lareqa.LareqaFormatError as e:
    raise CollectionError(str(e)) from e
  for lang, part in parsed.items():
    if not part.questions or not part.candidates:
      raise CollectionError(
          f"{part.path}: no {'questions' if not part.questions else 'candidates'} in the file; "
          "expected a LAReQA file (SQuAD JSON with 'sentences' and 'sentence_breaks').")
  langs = list(parsed)
  candidates = [c for lang in langs for c in parsed[lang].candidates]
  questions = [q for lang in langs for q in parsed[lang].questions]
  cand_index = {c.uid: i for i, c in enumerate(candidates)}
  gold_by_id: dict[str, list[int]] = collections.defaultdict(list)
  for q in questions:
    if cand_index[q.gold_uid] not in gold_by_id[q.id]:
      gold_by_id[q.id].append(cand_index[q.gold_uid])
  return Collection(
      name=name or os.path.basename(os.path.normpath(data_dir)), languages=langs,
      query_uids=[q.uid for q in questions], query_texts=[q.question for q in questions],
      query_langs=[q.lang for q in questions],
      candidate_uids=[c.uid for c in candidates],
      candidate_texts=[lareqa.candidate_text(c, candidate_context) for c in candidates],
      candidate_langs=[c.lang for c in candidates],
      relevant=[[(c, 1.0) for c in sorted(gold_by_id[q.id])] for q in questions])


def iter_jsonl(path: str, required: Sequence[str], *,
               error: type[errors.UserError] = CollectionError,
               what: str = "BEIR file") -> Iterator[tuple[int, dict]]:
  """(line number, object) of each non-empty line of a JSONL file (.jsonl.gz read compressed),
  streamed; a line that is not a JSON object, or lacks a required field, is an `error` naming
  file:line and the field."""
  # Decoded line by line: an undecodable byte is named by file, line and byte offset.
  for line_no, line in text_files.iter_lines(
      path, what, error, " (a BEIR directory holds corpus.jsonl, queries.jsonl and "
      "qrels/<split>.tsv).", quote=False):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise error(f"{path}:{line_no}: not a JSON object: {e}") from e
    if not isinstance(row, dict):
      raise error(f"{path}:{line_no}: expected a JSON object, found {type(row).__name__}")
    missing = [k for k in required if k not in row]
    if missing:
      raise error(f"{path}:{line_no}: missing field(s) {missing}; expected "
                  f"{list(required)}")
    yield line_no, row


def _read_jsonl(path: str, required: Sequence[str]) -> list[dict]:
  rows = [row for _, row in iter_jsonl(path, required)]
  if not rows:
    raise CollectionError(f"{path} is empty; expected one JSON object per line.")
  return rows


def read_qrels(path: str) -> dict[str, dict[str, float]]:
  """{query id: {corpus id: score}} of a BEIR qrels TSV (header optional)."""
  if not os.path.isfile(path):
    qrels_dir = os.path.dirname(path)
    found = sorted(os.listdir(qrels_dir)) if os.path.isdir(qrels_dir) else []
    raise CollectionError(f"BEIR qrels file {path} does not exist (found in {qrels_dir}: "
                          f"{found}); choose the split with --beir_split.")
  qrels: dict[str, dict[str, float]] = collections.defaultdict(dict)
  lines = text_files.iter_lines(path, "BEIR qrels file", CollectionError, quote=False)
  for line_no, row in enumerate(csv.reader((line for _, line in lines), delimiter="\t"), 1):
    if not row or (line_no == 1 and row[0] in ("query-id", "query_id", "qid")):
      continue
    if len(row) != 3:
      raise CollectionError(f"{path}:{line_no}: expected 3 tab-separated fields "
                            f"(query-id, corpus-id, score), found {len(row)}")
    try:
      qrels[row[0]][row[1]] = float(row[2])
    except ValueError as e:
      raise CollectionError(f"{path}:{line_no}: score {row[2]!r} is not a number") from e
  if not qrels:
    raise CollectionError(f"{path} has no qrels rows.")
  return qrels


def check_qrels_documents(qrels: dict[str, dict[str, float]], doc_ids, qrels_path: str,
                          corpus_path: str) -> None:
  """Every document the qrels name is in the corpus (a judged document missing from the corpus
  would silently count as never retrieved)."""
  unknown = sorted({d for q in qrels.values() for d in q if d not in doc_ids})
  if unknown:
    queries = sorted(q for q, docs in qrels.items() if any(d not in doc_ids for d in docs))
    raise CollectionError(
        f"{qrels_path} names {len(unknown)} corpus ids missing from {corpus_path}, e.g. "
        f"{unknown[:3]} (judged for queries {queries[:3]}); expected every qrels corpus-id to be "
        "an _id of corpus.jsonl. Check that qrels and corpus come from the same dataset version, "
        "or remove the stale qrels lines.")


def beir_doc_text(doc: dict) -> str:
  """A BEIR document as encoders read it: "title text" (the title omitted when empty)."""
  title = (doc.get("title") or "").strip()
  return f"{title} {doc['text']}" if title else doc["text"]


def from_beir(data_dir: str, *, split: str = "test", lang: str | None = None,
              name: str | None = None) -> Collection:
  """One BEIR-format directory: corpus.jsonl (_id, title, text), queries.jsonl, qrels/<split>.tsv.

  Only queries with at least one qrels entry are kept; a candidate is "title text" (title
  omitted when empty), as most BEIR encoders do.
  """
  lang = lang or os.path.basename(os.path.normpath(data_dir))
  corpus = _read_jsonl(os.path.join(data_dir, "corpus.jsonl"), ("_id", "text"))
  queries = _read_jsonl(os.path.join(data_dir, "queries.jsonl"), ("_id", "text"))
  qrels = read_qrels(os.path.join(data_dir, "qrels", f"{split}.tsv"))
  cand_index = {str(d["_id"]): i for i, d in enumerate(corpus)}
  query_rows = [q for q in queries if str(q["_id"]) in qrels]
  if not query_rows:
    raise CollectionError(f"{data_dir}: none of the {len(queries)} queries appears in "
                          f"qrels/{split}.tsv; do the ids match?")
  check_qrels_documents(qrels, cand_index, os.path.join(data_dir, "qrels", f"{split}.tsv"),
                        os.path.join(data_dir, "corpus.jsonl"))
  relevant = []
  for q in query_rows:
    rel = qrels[str(q["_id"])]
    relevant.append(sorted((cand_index[d], g) for d, g in rel.items() if g > 0))

  return Collection(
      name=name or os.path.basename(os.path.normpath(data_dir)), languages=[lang],
      query_uids=[str(q["_id"]) for q in query_rows], query_texts=[q["text"] for q in query_rows],
      query_langs=[lang] * len(query_rows),
      candidate_uids=[str(d["_id"]) for d in corpus],
      candidate_texts=[beir_doc_text(d) for d in corpus], candidate_langs=[lang] * len(corpus),
      relevant=relevant, cross_lingual=False)
