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

Passage ids (records.py `positive_id` / `negative_id`, the loss's false-negative mask): every
sentence is named by its candidate uid, positives and hard negatives alike, so a neighbouring
sentence that is some training question's gold sentence has that gold cell's id. Sentences are
not merged across questions: two questions sharing a gold sentence in one language have different
gold sentences elsewhere, and LAReQA counts only a question's own gold sentences as relevant. The
loss masks, for each row, the candidates that are one of its question's gold sentences in any
language (`relevant_passage_ids`, data/passage_ids.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Iterable, Sequence

from hybrid_jax import errors
from hybrid_jax.data import locations
from hybrid_jax.data import records
from hybrid_jax.data import text_files


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
  article: int = 0  # 0-based index of the article (data[a]) within the language file


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


def available_languages(data_dir: str) -> list[str]:
  """Language codes of the `<lang>.json` files in a LAReQA directory, sorted."""
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise LareqaFormatError(
        f"LAReQA directory {data_dir!r} is not a directory (it is a "
        f"{'file' if os.path.isfile(data_dir) else 'device or other special file'}); expected a "
        "directory with one <lang>.json per language, e.g. data.path=mlqa-r.")
  if not os.path.isdir(data_dir):
    raise LareqaFormatError(locations.missing_message(
        f"LAReQA directory {data_dir!r} (one <lang>.json per language) does not exist"))
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
  text_files.check_file(path, "LAReQA file", LareqaFormatError, allow_empty=True)
  try:
    content = text_files.read_text(path, "LAReQA file", LareqaFormatError, allow_empty=True)
    if not content.strip():
      raise LareqaFormatError("the file is empty")
    root = json.loads(content)
  except (OSError, LareqaFormatError, json.JSONDecodeError) as e:
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
            sentence_index=k, sentence=sentence, context=paragraph["context"], article=a))
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


HELDOUT_UNITS = ("article", "paragraph")
PARTS = ("all", "train", "test")


@dataclasses.dataclass(frozen=True)
class HeldoutSplit:
  """A held-out test part of a LAReQA directory, split by article (or paragraph).

  Question ids are grouped so that no text of the test part is ever a training text: two ids are
  in one group when they share an article (paragraph) in any language, and whole groups go to the
  test part. Training then drops the test ids and every sentence of the test articles, so neither
  a test question, its translations, nor any sentence of a test article (positive, hard negative
  or distractor) is seen; the test grid scores the test ids against the test articles' sentences.
  The split is a pure function of the directory's files and these fields, so a run's training and
  its evaluation (`evaluate --part=test`) agree without storing id lists.
  """
  fraction: float = 0.0  # share of question ids in the test part; 0 = no test part
  unit: str = "article"  # article | paragraph
  seed: int = 0  # group order; change it for another split of the same size

  @classmethod
  def from_config(cls, config) -> "HeldoutSplit":
    """From `config.data`-style fields heldout_fraction / heldout_unit / heldout_seed."""
    return cls(float(config.get("heldout_fraction", 0.0)),
               str(config.get("heldout_unit", "article")), int(config.get("heldout_seed", 0)))

  def validate(self, where: str = "data") -> "HeldoutSplit":
    if not 0.0 <= self.fraction < 1.0:
      raise LareqaFormatError(f"{where}.heldout_fraction must be in [0, 1), found {self.fraction}")
    if self.unit not in HELDOUT_UNITS:
      raise LareqaFormatError(f"{where}.heldout_unit must be one of {HELDOUT_UNITS}, found "
                              f"{self.unit!r}")
    return self


def _unit(candidate: Candidate, unit: str) -> tuple:
  return (candidate.lang, candidate.article if unit == "article" else candidate.paragraph)


@functools.lru_cache(maxsize=16)
def _id_groups_cached(data_dir: str, unit: str) -> tuple[tuple[str, ...], ...]:
  """Question ids grouped so that ids sharing an article (paragraph) in any language are in one
  group, each group sorted, groups in order of their first id."""
  parsed = read_languages(data_dir)  # every language file: a split cannot depend on a subset
  parent: dict = {}

  def find(node):
    root = node
    while parent.setdefault(root, root) != root:
      root = parent[root]
    while parent[node] != root:  # path compression
      parent[node], node = root, parent[node]
    return root

  for data in parsed.values():
    gold_of = {c.uid: c for c in data.candidates}
    for question in data.questions:
      parent[find(("id", question.id))] = find(("unit", _unit(gold_of[question.gold_uid], unit)))
  groups: dict = {}
  for node in list(parent):
    if node[0] == "id":
      groups.setdefault(find(node), []).append(node[1])
  return tuple(sorted(tuple(sorted(ids)) for ids in groups.values()))


def id_groups(data_dir: str, unit: str = "article") -> dict[str, str]:
  """{question id: its group's key (the group's smallest id)}: ids that share an article
  (paragraph) in any language, directly or through other ids, share a key. What the held-out
  split and the article-level validation split (data.validation_unit) keep together."""
  if unit not in HELDOUT_UNITS:
    raise LareqaFormatError(f"LAReQA group unit must be one of {HELDOUT_UNITS}, found {unit!r}")
  return {i: ids[0] for ids in _id_groups_cached(os.path.abspath(data_dir), unit) for i in ids}


@functools.lru_cache(maxsize=16)
def _heldout_ids_cached(data_dir: str, split: HeldoutSplit) -> frozenset[str]:
  members = sorted(_id_groups_cached(data_dir, split.unit), key=lambda ids: (
      hashlib.blake2b(f"{split.seed}:{ids[0]}".encode("utf-8"), digest_size=8).digest(), ids[0]))
  target = int(round(split.fraction * sum(len(ids) for ids in members)))
  test: set[str] = set()
  for ids in members:
    if len(test) >= target:
      break
    test.update(ids)
  return frozenset(test)


def heldout_ids(data_dir: str, split: HeldoutSplit) -> frozenset[str]:
  """The question ids of the test part (empty when split.fraction is 0)."""
  split.validate()
  if split.fraction == 0:
    return frozenset()
  return _heldout_ids_cached(os.path.abspath(data_dir), split)


def select_part(parsed: dict[str, LareqaLanguage], test_ids: frozenset[str], part: str,
                unit: str = "article") -> dict[str, LareqaLanguage]:
  """The train or test part of parsed languages (see HeldoutSplit); part "all" returns them.

  test: the test ids' questions and every sentence of their articles (paragraphs); train: the
  other questions and the sentences of the other articles."""
  if part not in PARTS:
    raise LareqaFormatError(f"LAReQA part must be one of {PARTS}, found {part!r}")
  if part == "all":
    return parsed
  want_test = part == "test"
  out = {}
  for lang, data in parsed.items():
    gold_of = {c.uid: c for c in data.candidates}
    test_units = {_unit(gold_of[q.gold_uid], unit) for q in data.questions if q.id in test_ids}
    out[lang] = LareqaLanguage(
        lang=lang, path=data.path,
        questions=[q for q in data.questions if (q.id in test_ids) == want_test],
        candidates=[c for c in data.candidates if (_unit(c, unit) in test_units) == want_test])
  return out


def read_part(data_dir: str, langs: Iterable[str] | None, split: HeldoutSplit | None,
              part: str) -> dict[str, LareqaLanguage]:
  """read_languages restricted to one part of a held-out split (None or fraction 0: all)."""
  parsed = read_languages(data_dir, langs)
  if split is None or split.fraction == 0 or part == "all":
    if part == "test":
      raise LareqaFormatError("the LAReQA test part needs a held-out split (heldout_fraction > "
                              "0, e.g. 0.2); with none, every id is a training id")
    return parsed
  return select_part(parsed, heldout_ids(data_dir, split), part, split.unit)


def candidate_text(candidate: Candidate, with_context: bool) -> str:
  """A LAReQA candidate as one text: the sentence, or the sentence followed by its paragraph.

  LAReQA's encoders take (sentence, context) as two inputs; a single-input encoder sees both,
  sentence first so that truncation cuts the context, not the answer. Training passages and
  evaluation candidates both come from here, so a model is evaluated on the text it trained on.
  """
  return f"{candidate.sentence} {candidate.context}" if with_context else candidate.sentence


def training_examples(data_dir: str, languages: Sequence[str] | None = None,
                      with_context: bool = False,
                      heldout: HeldoutSplit | None = None) -> list[records.ParallelExample]:
  """One parallel example per question id over the files of `languages` (default: all).

  Ids are ordered by first appearance, scanning the languages in order. With a held-out split,
  only the train part: no test id, and no hard negative from a test article.
  """
  parsed = read_part(data_dir, languages or None, heldout, "train")
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
          candidate_text(negative, with_context) if negative is not None else None,
          positive_id=gold.uid, negative_id=negative.uid if negative is not None else None)
  return [records.ParallelExample(qid, langs) for qid, langs in by_id.items()]


def _neighbour(candidates: list[Candidate], i: int) -> Candidate | None:
  """A sentence of the same paragraph next to candidates[i], else the first sentence of the next
  paragraph of the same article (cyclically), else, for a one-sentence article, the next one.

  Staying inside the article keeps the article-level splits (held-out test, validation) closed:
  a training row's negative is never a sentence of another article, which may be on the other
  side (MLQA-R: 185 of 4,199 rows took the next article's sentence before this rule).
  """
  gold = candidates[i]
  for j in (i + 1, i - 1):
    if 0 <= j < len(candidates) and candidates[j].paragraph == gold.paragraph:
      return candidates[j]
  if len(candidates) < 2:
    return None
  others = [j for j in range(len(candidates)) if j != i]
  same_article = [j for j in others if candidates[j].article == gold.article]
  pool = same_article or others
  # The first candidate after i in file order (cyclically) among the pool.
  after = [j for j in pool if j > i]
  return candidates[after[0] if after else pool[0]]
