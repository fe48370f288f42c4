"""Reader for LAReQA files (XQuAD-R, MLQA-R): SQuAD JSON plus a sentence split per paragraph.

One file per language, `<lang>.json`. Each paragraph has `context`, `qas`, `sentences` and
`sentence_breaks` ([start, end) character offsets into `context`). A question's gold candidate is
the sentence whose span contains the answer's `answer_start`; the same question `id` in another
language file is the translation of the question (LAReQA, Roy et al. 2020, sec. 3.1).

Identifiers follow LAReQA: question uid `{id}_{lang}`; candidate uid `{lang}_{n}_{k}` with n the
1-based paragraph counter within the language file and k the 0-based sentence index.

Besides parsing, this module owns the two views that training and evaluation must agree on: the
text of a candidate (`candidate_text`, used by the training pairs and by eval/collection.py) and
the training pairs themselves (`training_examples`, used by data/sources.py, the converter and the
TFDS builders). Training pairs: for every question, query = the question and positive = its gold
sentence's candidate text. The hard negative is a neighbouring sentence of the same paragraph (the
next one, else the previous one; a one-sentence paragraph uses the first sentence of the next
paragraph). An id is paired only in the languages whose file holds it: MLQA-R ids exist in 2 to 4
of its 7 languages.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

from hybrid_jax import errors
from hybrid_jax.data import records

DATA_ENV_VAR = "HYBRID_JAX_DATA"


class LareqaFormatError(errors.UserError):
  """A LAReQA file is missing, unreadable or does not follow the format."""


@dataclasses.dataclass(frozen=True)
class Candidate:
  uid: str  # "{lang}_{n}_{k}"
  lang: str
  paragraph: int  # 1-based paragraph counter within the language file
  sentence_index: int  # 0-based index within the paragraph
  sentence: str
  context: str  # the whole paragraph


@dataclasses.dataclass(frozen=True)
class Question:
  uid: str  # "{id}_{lang}"
  id: str  # shared by the translations of one question across languages
  lang: str
  question: str
  gold_uid: str  # uid of the sentence holding the answer, in the same language


@dataclasses.dataclass(frozen=True)
class LareqaLanguage:
  lang: str
  path: str
  questions: list[Question]
  candidates: list[Candidate]


def default_data_root() -> str:
  """Directory of the shared real data: $HYBRID_JAX_DATA, else ../shared/data beside the repo."""
  if os.environ.get(DATA_ENV_VAR):
    return os.environ[DATA_ENV_VAR]
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(os.path.dirname(repo), "shared", "data")


def available_languages(data_dir: str) -> list[str]:
  """Language codes of the `<lang>.json` files in a LAReQA directory, sorted."""
  if not os.path.isdir(data_dir):
    raise LareqaFormatError(
        f"LAReQA directory {data_dir!r} does not exist. Point --data_dir (or ${DATA_ENV_VAR}) at "
        "a folder with one <lang>.json per language, e.g. ../shared/data/xquad-r.")
  langs = sorted(f[:-5] for f in os.listdir(data_dir) if f.endswith(".json"))
  if not langs:
    raise LareqaFormatError(f"No <lang>.json files in LAReQA directory {data_dir!r}.")
  return langs


def _require(condition: bool, path: str, where: str, message: str) -> None:
  if not condition:
    raise LareqaFormatError(f"{path}: {where}: {message}")


def read_language(data_dir: str, lang: str) -> LareqaLanguage:
  """Parses `<data_dir>/<lang>.json` into questions (with their gold sentence) and candidates."""
  path = os.path.join(data_dir, f"{lang}.json")
  if not os.path.isfile(path):
    found = available_languages(data_dir) if os.path.isdir(data_dir) else []
    raise LareqaFormatError(
        f"Language {lang!r} has no file {path}. Languages present in {data_dir!r}: {found}.")
  try:
    with open(path, encoding="utf-8") as f:
      root = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise LareqaFormatError(f"{path}: cannot read as JSON: {e}") from e
  _require(isinstance(root, dict) and isinstance(root.get("data"), list), path, "top level",
           'expected {"data": [article, ...]} (SQuAD format)')

  questions: list[Question] = []
  candidates: list[Candidate] = []
  paragraph_counter = 0
  for a, article in enumerate(root["data"]):
    paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
    _require(isinstance(paragraphs, list), path, f"data[{a}]", "missing 'paragraphs' list")
    for p, paragraph in enumerate(paragraphs):
      where = f"data[{a}].paragraphs[{p}]"
      for field in ("context", "qas", "sentences", "sentence_breaks"):
        _require(isinstance(paragraph, dict) and field in paragraph, path, where,
                 f"missing field {field!r} (LAReQA files carry 'sentences' and 'sentence_breaks')")
      sentences, breaks = paragraph["sentences"], paragraph["sentence_breaks"]
      _require(len(sentences) == len(breaks), path, where,
               f"{len(sentences)} sentences but {len(breaks)} sentence_breaks")
      paragraph_counter += 1
      for k, sentence in enumerate(sentences):
        candidates.append(Candidate(
            uid=f"{lang}_{paragraph_counter}_{k}", lang=lang, paragraph=paragraph_counter,
            sentence_index=k, sentence=sentence, context=paragraph["context"]))
      for q, qa in enumerate(paragraph["qas"]):
        qwhere = f"{where}.qas[{q}]"
        _require(isinstance(qa, dict) and "id" in qa and "question" in qa and qa.get("answers"),
                 path, qwhere, "expected {'id', 'question', 'answers': [{'answer_start'}]}")
        start = qa["answers"][0].get("answer_start")
        _require(isinstance(start, int), path, qwhere, "answers[0].answer_start is not an int")
        gold = [k for k, (s, e) in enumerate(breaks) if s <= start < e]
        _require(len(gold) == 1, path, qwhere,
                 f"answer_start {start} falls in {len(gold)} sentence spans (expected exactly 1)")
        questions.append(Question(
            uid=f"{qa['id']}_{lang}", id=qa["id"], lang=lang, question=qa["question"],
            gold_uid=f"{lang}_{paragraph_counter}_{gold[0]}"))
  return LareqaLanguage(lang=lang, path=path, questions=questions, candidates=candidates)


def read_languages(data_dir: str, langs: Iterable[str] | None = None) -> dict[str, LareqaLanguage]:
  """Reads several languages (all files in the directory by default), keyed by language."""
  langs = list(langs) if langs else available_languages(data_dir)
  return {lang: read_language(data_dir, lang) for lang in langs}


def candidate_text(candidate: Candidate, with_context: bool) -> str:
  """A LAReQA candidate as one text: the sentence, or the sentence followed by its paragraph.

  LAReQA's encoders take (sentence, context) as two inputs; a single-input encoder sees both,
  sentence first so that truncation cuts the context, not the answer. Training passages and
  evaluation candidates both come from here, so a model is evaluated on the text it trained on.
  """
  return f"{candidate.sentence} {candidate.context}" if with_context else candidate.sentence


def training_examples(data_dir: str, languages: Sequence[str] | None = None,
                      with_context: bool = False) -> list[records.ParallelExample]:
  """One parallel example per question id over the files of `languages` (default: all).

  Ids are ordered by first appearance, scanning the languages in order.
  """
  parsed = read_languages(data_dir, languages or None)
  by_id: dict[str, dict[str, records.LanguageTexts]] = {}
  for lang, data in parsed.items():
    position = {c.uid: i for i, c in enumerate(data.candidates)}
    seen: set[str] = set()
    for question in data.questions:
      if question.id in seen:
        raise records.DataError(f"{data.path}: question id {question.id!r} occurs twice; LAReQA "
                                "files hold each id once per language")
      seen.add(question.id)
      i = position[question.gold_uid]
      gold = data.candidates[i]
      negative = _neighbour(data.candidates, i)
      by_id.setdefault(question.id, {})[lang] = records.LanguageTexts(
          question.question, candidate_text(gold, with_context),
          candidate_text(negative, with_context) if negative is not None else None)
  return [records.ParallelExample(qid, langs) for qid, langs in by_id.items()]


def _neighbour(candidates: list[Candidate], i: int) -> Candidate | None:
  """A sentence of the same paragraph next to candidates[i], else the next paragraph's first."""
  gold = candidates[i]
  for j in (i + 1, i - 1):
    if 0 <= j < len(candidates) and candidates[j].paragraph == gold.paragraph:
      return candidates[j]
  if len(candidates) < 2:
    return None
  j = i + 1
  while j % len(candidates) != i and candidates[j % len(candidates)].paragraph == gold.paragraph:
    j += 1
  return candidates[j % len(candidates)]
