"""MKQA: parallel questions in 26 languages against one corpus, scored by answer recall.

MKQA (Longpre et al. 2021) is 10k Natural Questions translated into 26 languages, with answers
per language. As in the BGE-M3 paper's cross-lingual evaluation, queries of each chosen language
are searched in one corpus (BEIR format, e.g. English Wikipedia passages), and a query counts as
answered at k when one of its top-k passages contains an answer: Recall@20 and Recall@100 per
language and their macro average.

The official file (`mkqa.jsonl` or `.jsonl.gz`), one example per line:
    {"example_id": 563260143484355911, "query": "...English...",
     "queries": {"en": "...", "de": "...", ...},
     "answers": {"en": [{"type": "entity", "text": "...", "aliases": ["..."]}], "de": [...]}}
Answer types: entity, long_answer, unanswerable, date, number, number_with_unit, short_phrase,
binary. Protocol (BGE-M3): unanswerable, binary (yes/no) and long-answer queries are dropped,
i.e. a query is kept when its answers in the answer language have none of those types and at
least one non-empty text. The answer language is a choice, recorded in results.json: "en" (the
English answers, for an English corpus, BGE-M3's setting) or "query" (the answers in the query's
own language, for a corpus in that language).

Matching follows DPR's `has_answer` (string match): passage text and every answer string (text and
aliases) are Unicode-NFD normalised, tokenised into runs of letters, digits and combining marks or
single other non-space characters, lower-cased; a passage contains an answer when the answer's
tokens occur in it as a contiguous subsequence. The passage is the corpus row's `text` (DPR
matches the text, not the title).

Corpus texts are never all in memory: after the search, one streaming pass over corpus.jsonl
checks only the passages some query retrieved.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import unicodedata
from typing import Iterable, Mapping, Sequence

import numpy as np
import regex

from hybrid_jax import errors
from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import grid as grid_lib
from hybrid_jax.eval import grid_evaluator
from hybrid_jax.eval import metrics as metrics_lib
from hybrid_jax.eval import report
from hybrid_jax.search import corpus_eval
from hybrid_jax.search import trec

RECALL_CUTOFFS = (20, 100)
METRICS = tuple(f"recall@{k}" for k in RECALL_CUTOFFS)
DROPPED_ANSWER_TYPES = frozenset({"unanswerable", "binary", "long_answer"})
ANSWER_LANGUAGES = ("en", "query")  # "en": English answers; "query": the query's language
RECALL_PNG = "answer_recall.png"

# DPR's SimpleTokenizer: runs of letters / digits / combining marks, or one other visible char.
_TOKEN = regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", flags=regex.UNICODE | regex.MULTILINE)


class MkqaFormatError(errors.UserError):
  """An MKQA file line lacks a field or has the wrong shape."""


def answer_tokens(text: str) -> tuple[str, ...]:
  """DPR-normalised tokens: NFD, tokenised, lower-cased."""
  return tuple(t.lower() for t in _TOKEN.findall(unicodedata.normalize("NFD", text)))


def contains_answer(passage_tokens: Sequence[str], answers: Iterable[tuple[str, ...]]) -> bool:
  """Whether one of the (tokenised) answers occurs contiguously in the passage's tokens."""
  starts = None
  for answer in answers:
    if not answer:
      continue
    if starts is None:  # token -> positions, built once per passage
      starts = collections.defaultdict(list)
      for i, token in enumerate(passage_tokens):
        starts[token].append(i)
    n = len(answer)
    for i in starts.get(answer[0], ()):
      if tuple(passage_tokens[i:i + n]) == answer:
        return True
  return False


@dataclasses.dataclass(frozen=True)
class MkqaQuery:
  uid: str  # "{example_id}_{lang}"
  example_id: str
  lang: str
  text: str
  answers: tuple[tuple[str, ...], ...]  # tokenised answer strings (texts and aliases)


@dataclasses.dataclass(frozen=True)
class MkqaSet:
  languages: list[str]
  queries: list[MkqaQuery]
  num_examples: int
  dropped: dict[str, int]  # language -> queries dropped by the protocol
  answer_language: str


def _field(row: Mapping, name: str, kind: type, path: str, line_no: int):
  value = row.get(name)
  if not isinstance(value, kind):
    raise MkqaFormatError(
        f"{path}:{line_no}: field {name!r} must be a {kind.__name__}, found "
        f"{type(value).__name__}; expected the official MKQA format (example_id, query, queries, "
        "answers).")
  return value


def _answer_strings(answers, path: str, line_no: int, where: str) -> list[str] | None:
  """Answer texts and aliases; None when the protocol drops the query."""
  if not isinstance(answers, list):
    raise MkqaFormatError(f"{path}:{line_no}: field {where!r} must be a list of answers "
                          f"({{'type', 'text', 'aliases'}}), found {type(answers).__name__}")
  strings = []
  for j, answer in enumerate(answers):
    if not isinstance(answer, Mapping) or "type" not in answer:
      raise MkqaFormatError(f"{path}:{line_no}: field {where}[{j}] lacks 'type'; each answer is "
                            "{'type': ..., 'text': ..., 'aliases': [...]}")
    if answer["type"] in DROPPED_ANSWER_TYPES:
      return None
    aliases = answer.get("aliases") or []
    if not isinstance(aliases, list):
      raise MkqaFormatError(f"{path}:{line_no}: field {where}[{j}].aliases must be a list")
    strings += [s for s in [answer.get("text")] + aliases if isinstance(s, str) and s.strip()]
  return strings or None


def read_mkqa(path: str, languages: Sequence[str] | None = None,
              answer_language: str = "en") -> MkqaSet:
  """The kept queries of every chosen language (default: all languages of the file)."""
  if answer_language not in ANSWER_LANGUAGES:
    raise MkqaFormatError(f"MKQA answer language {answer_language!r}: expected one of "
                          f"{ANSWER_LANGUAGES} ('query' = the query's own language)")
  queries, dropped, num_examples = [], collections.Counter(), 0
  chosen = list(languages) if languages else None
  for line_no, row in collection_lib.iter_jsonl(path, ("example_id", "query", "queries",
                                                       "answers"), error=MkqaFormatError,
                                                what="MKQA file"):
    texts = _field(row, "queries", dict, path, line_no)
    answers = _field(row, "answers", dict, path, line_no)
    if chosen is None:
      chosen = sorted(texts)
      if not chosen:
        raise MkqaFormatError(f"{path}:{line_no}: field 'queries' is empty")
    num_examples += 1
    for lang in chosen:
      if lang not in texts:
        raise MkqaFormatError(
            f"{path}:{line_no}: field queries.{lang} is missing (languages here: "
            f"{sorted(texts)}); pass --languages among MKQA's languages.")
      answer_lang = lang if answer_language == "query" else "en"
      if answer_lang not in answers:
        raise MkqaFormatError(f"{path}:{line_no}: field answers.{answer_lang} is missing")
      strings = _answer_strings(answers[answer_lang], path, line_no, f"answers.{answer_lang}")
      if strings is None or not isinstance(texts[lang], str) or not texts[lang].strip():
        dropped[lang] += 1
        continue
      example_id = str(row["example_id"])
      tokens = tuple(dict.fromkeys(t for t in map(answer_tokens, strings) if t))
      queries.append(MkqaQuery(f"{example_id}_{lang}", example_id, lang, texts[lang], tokens))
  if not num_examples:
    raise MkqaFormatError(f"{path} is empty; expected one MKQA example per line.")
  return MkqaSet(languages=chosen, queries=queries, num_examples=num_examples,
                 dropped={lang: dropped[lang] for lang in chosen},
                 answer_language=answer_language)


def answer_hits(corpus_path: str, indices: np.ndarray,
                answers: Sequence[tuple[tuple[str, ...], ...]],
                row_positions: np.ndarray | None = None) -> np.ndarray:
  """[Q, k] bool: whether retrieved passage indices[q, r] contains one of query q's answers.

  indices are positions in the searched embeddings; row_positions[i] is the position of
  corpus.jsonl's i-th row there (None: the same order). One streaming pass over the corpus
  tokenises only the retrieved passages; the bookkeeping is a few integer arrays (no per-pair
  Python objects: 26 languages x 6.7k queries x 100 passages are 17M pairs)."""
  num_queries, k = indices.shape
  flat = indices.reshape(-1).astype(np.int64)
  order = np.argsort(flat, kind="stable")  # pair numbers (q * k + r), grouped by document
  size = int(flat.max()) + 1 if flat.size else 0
  if row_positions is not None:
    size = max(size, len(row_positions))
  starts = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=size))])
  hits = np.zeros(num_queries * k, bool)
  for row, (_, doc) in enumerate(collection_lib.iter_jsonl(corpus_path, ("_id", "text"))):
    position = row if row_positions is None else int(row_positions[row])
    if position >= size or starts[position] == starts[position + 1]:
      continue
    tokens = answer_tokens(doc["text"])
    for pair in order[starts[position]:starts[position + 1]]:
      hits[pair] = contains_answer(tokens, answers[pair // k])
  return hits.reshape(num_queries, k)


class MkqaEvaluator(corpus_eval.CorpusEvaluator):
  """MKQA queries (one or more languages) against one BEIR-format corpus; answer recall."""

  type_name = "mkqa"
  default_trec_depth = max(RECALL_CUTOFFS)

  def __init__(self, mkqa_file: str, corpus_dir: str, languages: Sequence[str] = (),
               answer_language: str = "en", name: str | None = None, **kwargs):
    super().__init__(**kwargs)
    if not mkqa_file or not corpus_dir:
      raise grid_evaluator.EvaluatorConfigError(
          "MkqaEvaluator needs mkqa_file (the official mkqa.jsonl[.gz]) and corpus_dir (a BEIR "
          f"directory with corpus.jsonl); found mkqa_file={mkqa_file!r}, "
          f"corpus_dir={corpus_dir!r}")
    if answer_language not in ANSWER_LANGUAGES:
      raise grid_evaluator.EvaluatorConfigError(
          f"MKQA answer language {answer_language!r}: expected one of {ANSWER_LANGUAGES}")
    self.mkqa_file, self.corpus_dir = mkqa_file, corpus_dir
    self.languages, self.answer_language = tuple(languages), answer_language
    self.name = name or "mkqa"
    self.mkqa: MkqaSet | None = None

  @classmethod
  def from_spec(cls, name: str, spec: Mapping, **common) -> "MkqaEvaluator":
    return cls(spec.get("mkqa_file", ""), spec.get("corpus_dir", ""),
               tuple(spec.get("languages") or ()), spec.get("answer_language") or "en", name,
               **common, **cls.common_spec_options(spec))

  def _load_collection(self) -> corpus_eval.CorpusQueries:
    self.mkqa = read_mkqa(self.mkqa_file, self.languages or None, self.answer_language)
    corpus_path = os.path.join(self.corpus_dir, "corpus.jsonl")
    doc_ids, _ = corpus_eval.read_corpus_ids(corpus_path)
    queries = self.mkqa.queries
    if not queries:
      raise MkqaFormatError(f"{self.mkqa_file}: no query of {self.mkqa.languages} survives the "
                            "protocol (all unanswerable, binary or long-answer)")
    return corpus_eval.CorpusQueries(
        name=self.name, languages=list(self.mkqa.languages),
        query_uids=[q.uid for q in queries], query_texts=[q.text for q in queries],
        query_langs=[q.lang for q in queries], candidate_uids=doc_ids, corpus_path=corpus_path,
        cross_lingual=True)

  def score(self, query_emb: np.ndarray, corpus):
    col = self.collection
    depth = max(self.trec_depth, max(RECALL_CUTOFFS))
    result = self.search(query_emb, corpus, depth)
    cutoff = min(max(RECALL_CUTOFFS), result.indices.shape[1])
    row_positions = None  # the store is written in corpus.jsonl order; --embeddings may not be
    if list(corpus.ids) != list(col.candidate_uids):
      position = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
      row_positions = np.array([position[d] for d in col.candidate_uids], np.int64)
    hits = answer_hits(col.corpus_path, result.indices[:, :cutoff],
                       [q.answers for q in self.mkqa.queries], row_positions)
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)  # 0: no hit
    num_langs = len(col.languages)
    values = {}
    for k, name in zip(RECALL_CUTOFFS, METRICS):
      values[name] = np.full((col.num_queries, num_langs + 1), np.nan, np.float32)
      values[name][:, num_langs] = (first_hit >= 1) & (first_hit <= k)
    num_hits = np.zeros((col.num_queries, num_langs + 1), np.int32)
    best_rank = np.zeros_like(num_hits)
    num_hits[:, num_langs] = hits.sum(axis=1)
    best_rank[:, num_langs] = first_hit
    per_query = metrics_lib.PerQueryMetrics(
        values=values, num_relevant=num_hits, best_rank=best_rank,
        rank_distance=np.full(col.num_queries, np.nan, np.float32))
    results = grid_lib.summarize(col, per_query, self.language_groups(), pool_only=True,
                                 metrics=METRICS, rank_distance=False)
    kept = collections.Counter(col.query_langs)
    results["mkqa"] = {
        "answer_language": self.answer_language, "num_examples": self.mkqa.num_examples,
        "queries_per_language": {lang: kept[lang] for lang in col.languages},
        "dropped_per_language": self.mkqa.dropped,
        "dropped_answer_types": sorted(DROPPED_ANSWER_TYPES),
        "match": "DPR has_answer: NFD, lower-case, tokens of letters/digits/marks or single "
                 "symbols, contiguous token match of answer text or alias in the passage text",
        "num_documents": corpus.shape[0]}
    self.last_run = (col.query_uids, corpus.ids, result.indices, result.scores)
    return per_query, results

  def run_info(self) -> dict:
    return {**super().run_info(), "mkqa_file": self.mkqa_file,
            "answer_language": self.answer_language}

  def summary_table(self, results: dict) -> str:
    lines = ["| query lang | R@20 | R@100 | queries | dropped |", "|---|---|---|---|---|"]
    dropped = results["mkqa"]["dropped_per_language"]
    for entry in results["multilingual_by_lang"]:
      lines.append(f"| {entry['query_lang']} | {_fmt(entry['recall@20'])} | "
                   f"{_fmt(entry['recall@100'])} | {entry['num_queries']} | "
                   f"{dropped.get(entry['query_lang'], 0)} |")
    summary = results["summary"]["multilingual"]
    lines.append(f"| **average** | {_fmt(summary['recall@20'])} | {_fmt(summary['recall@100'])} "
                 f"| {summary['num_queries']} | {sum(dropped.values())} |")
    return "\n".join(lines)

  def write_reports(self, output_dir: str, per_query, results: dict,
                    header_lines: Sequence[str] = (), meta: dict | None = None) -> list[str]:
    os.makedirs(output_dir, exist_ok=True)
    written = [report.write_results_json(output_dir, results, meta),
               report.write_settings_csv(output_dir, results),
               report.write_per_query(output_dir, self.collection, per_query)]
    answer_lang = results["mkqa"]["answer_language"]
    lines = [f"# MKQA answer recall: {results['dataset']}", "", *header_lines, "",
             f"Answers in {'English' if answer_lang == 'en' else 'the query language'} "
             f"(answer_language={answer_lang!r}); dropped answer types: "
             f"{', '.join(results['mkqa']['dropped_answer_types'])}. A query is answered at k "
             "when a top-k passage contains an answer (DPR has_answer). "
             f"{results['mkqa']['num_documents']} passages.", "", self.summary_table(results), ""]
    path = os.path.join(output_dir, report.RESULTS_MD)
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(lines))
    written += [path, _plot_recall(output_dir, results)]
    query_uids, doc_ids, indices, scores = self.last_run
    written.append(trec.write_run(os.path.join(output_dir, corpus_eval.RUN_FILE), query_uids,
                                  doc_ids, indices, scores, depth=self.trec_depth))
    return written


def _fmt(value) -> str:
  return "-" if value is None or value != value else f"{value:.3f}"


def _plot_recall(output_dir: str, results: dict) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  entries = results["multilingual_by_lang"]
  langs = [e["query_lang"] for e in entries]
  x = np.arange(len(langs))
  fig, ax = plt.subplots(figsize=(1.5 + 0.5 * len(langs), 3.6))
  for offset, name in ((-0.2, "recall@20"), (0.2, "recall@100")):
    ax.bar(x + offset, [e[name] or 0.0 for e in entries], width=0.4, label=name)
  ax.set_xticks(x, langs)
  ax.set_ylim(0, 1)
  ax.set_xlabel("query language")
  ax.set_ylabel("answer recall")
  ax.set_title(f"{results['dataset']}: answer recall (answers: "
               f"{results['mkqa']['answer_language']})")
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  path = os.path.join(output_dir, RECALL_PNG)
  fig.savefig(path, dpi=130)
  plt.close(fig)
  return path
