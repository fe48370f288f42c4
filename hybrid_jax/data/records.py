"""Parallel examples: the on-disk JSONL format, its reader/writer, and the in-memory corpus.

A parallel example is one question id with, in every language it exists in, the query, its
positive passage and optionally a hard-negative passage. On disk it is one JSON object per line:

    {"id": "q17", "languages": {"en": {"query": "...", "positive": "...", "negative": "..."},
                                "de": {"query": "...", "positive": "..."}}}

  id         string (or integer, read as its decimal string), unique in the file.
  languages  non-empty object: language code -> {"query", "positive"[, "negative"]}, all
             non-empty strings. Codes are free-form strings without whitespace ("en", "zh-Hans").
  meta       optional, any JSON value; ignored (provenance, notes).
Any other key is an error, so that a typo ("postive") cannot silently drop data.

Optional per-language fields (files without them read as before):
  positive_id, negative_id   passage ids (non-empty strings): passages with equal ids are the same
             passage (the same text, up to formatting), in whatever language or row they occur; a
             negative that is some question's gold passage carries that passage's id, so the loss
             can mask it as a false negative (data/passage_ids.py; a passage without an id is
             identified by its text). A record's positives in its other languages need no shared
             id: they are all relevant to each of its rows.
  negatives_by_query_language   {X: {"text": ..., "id"?: ...}}: the hard negative of a row whose
             positive is in this language and whose query is in language X (another language of
             the record). Rows without one (X = this language, or X not listed) use "negative".
             Written by hard-negative mining (data/mining.py), so that a cross-lingual row can get
             a negative in its query's language.

In memory, a `ParallelCorpus` stores the texts as [N, K] object arrays (N ids, K languages,
`None` where an id lacks a language) so the sampler can select rows and languages with NumPy.
The held-out validation split is by question id (`split_by_id`): every language of an id is on the
same side, so validation loss never sees a translation of a training question. With
`ParallelCorpus.groups` (LAReQA, data.validation_unit "article"), whole groups of ids that share an
article go to one side, so no validation gold sentence is a training text either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from hybrid_jax import errors
from hybrid_jax.data import text_files

_ALLOWED_TOP_KEYS = ("id", "languages", "meta")
_TEXT_KEYS = ("query", "positive", "negative")
_PASSAGE_ID_KEYS = ("positive_id", "negative_id")
_BY_QUERY_KEY = "negatives_by_query_language"
_ALLOWED_LANGUAGE_KEYS = _TEXT_KEYS + _PASSAGE_ID_KEYS + (_BY_QUERY_KEY,)


class DataError(errors.UserError):
  """Data files or the data config are malformed; the message names the file/record or field."""


@dataclasses.dataclass(frozen=True)
class Negative:
  """A hard-negative passage and its passage id (None: derived, see data/passage_ids.py)."""
  text: str
  id: str | None = None


@dataclasses.dataclass(frozen=True)
class LanguageTexts:
  query: str
  positive: str
  negative: str | None = None
  positive_id: str | None = None  # passage id of the positive (None: from its text)
  negative_id: str | None = None  # passage id of the negative (None: derived from its text)
  # Query language X -> the negative of rows (query X, positive this language); others: negative.
  negatives_by_query_language: dict[str, Negative] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ParallelExample:
  id: str
  languages: dict[str, LanguageTexts]  # language code -> texts; only the languages the id has

  def to_json(self) -> dict:
    langs = {}
    for lang, texts in self.languages.items():
      entry = {"query": texts.query, "positive": texts.positive}
      for key in ("negative",) + _PASSAGE_ID_KEYS:
        if getattr(texts, key) is not None:
          entry[key] = getattr(texts, key)
      if texts.negatives_by_query_language:
        entry[_BY_QUERY_KEY] = {
            x: {"text": n.text, **({"id": n.id} if n.id is not None else {})}
            for x, n in texts.negatives_by_query_language.items()}
      langs[lang] = entry
    return {"id": self.id, "languages": langs}


# --- JSONL ----------------------------------------------------------------------------------------
def _fail(where: str, message: str) -> None:
  raise DataError(f"{where}: {message}")


def parse_record(record, where: str) -> ParallelExample:
  """Validates one decoded JSON record; `where` ("FILE:LINE") prefixes every error."""
  if not isinstance(record, dict):
    _fail(where, f"expected a JSON object {{\"id\", \"languages\"}}, found {type(record).__name__}")
  unknown = sorted(set(record) - set(_ALLOWED_TOP_KEYS))
  if unknown:
    _fail(where, f"unknown field(s) {unknown}; allowed: {list(_ALLOWED_TOP_KEYS)}")
  for field in ("id", "languages"):
    if field not in record:
      _fail(where, f"missing field {field!r} (a record is "
            '{"id": ..., "languages": {LANG: {"query": ..., "positive": ...}}})')
  qid = record["id"]
  if isinstance(qid, bool) or not isinstance(qid, (str, int)) or (isinstance(qid, str) and not qid):
    _fail(where, f"field 'id' must be a non-empty string or an integer, found {qid!r}")
  qid = str(qid)
  languages = record["languages"]
  if not isinstance(languages, dict) or not languages:
    _fail(where, f"record {qid!r}: field 'languages' must be a non-empty object "
          f"{{LANG: {{...}}}}, found {languages!r:.80}")
  parsed = {}
  for lang, entry in languages.items():
    if not lang or any(c.isspace() for c in lang):
      _fail(where, f"record {qid!r}: language code {lang!r} is empty or contains whitespace")
    lwhere = f"record {qid!r}, language {lang!r}"
    if not isinstance(entry, dict):
      _fail(where, f"{lwhere}: expected an object with 'query' and 'positive', found "
            f"{type(entry).__name__}")
    unknown = sorted(set(entry) - set(_ALLOWED_LANGUAGE_KEYS))
    if unknown:
      _fail(where, f"{lwhere}: unknown field(s) {unknown}; allowed: {list(_ALLOWED_LANGUAGE_KEYS)}")
    for field in ("query", "positive"):
      if field not in entry:
        _fail(where, f"{lwhere}: missing field {field!r}")
    for field in _TEXT_KEYS + _PASSAGE_ID_KEYS:
      if field in entry and (not isinstance(entry[field], str) or not entry[field].strip()):
        _fail(where, f"{lwhere}: field {field!r} must be a non-empty string, "
              f"found {entry[field]!r:.80}")
    if "negative_id" in entry and "negative" not in entry:
      _fail(where, f"{lwhere}: field 'negative_id' names the passage of a 'negative', but there "
            "is no 'negative'; add it or drop 'negative_id'")
    by_query = _parse_negatives_by_query(entry.get(_BY_QUERY_KEY, {}), lang, set(languages),
                                         where, lwhere)
    parsed[lang] = LanguageTexts(entry["query"], entry["positive"], entry.get("negative"),
                                 entry.get("positive_id"), entry.get("negative_id"), by_query)
  return ParallelExample(qid, parsed)


def _parse_negatives_by_query(value, lang: str, record_languages: set[str], where: str,
                              lwhere: str) -> dict[str, Negative]:
  """The optional {X: {"text", "id"?}} field of one language entry, validated."""
  fwhere = f"{lwhere}, field {_BY_QUERY_KEY!r}"
  if not isinstance(value, dict):
    _fail(where, f"{fwhere}: expected an object {{QUERY_LANG: {{\"text\": ...}}}}, found "
          f"{type(value).__name__}")
  parsed = {}
  for query_lang, negative in value.items():
    if query_lang == lang:
      _fail(where, f"{fwhere}: key {query_lang!r} is this entry's own language; the negative of "
            "rows whose query and positive share the language is 'negative'")
    if query_lang not in record_languages:
      _fail(where, f"{fwhere}: key {query_lang!r} is not a language of this record "
            f"({sorted(record_languages)}); no row has a query in it")
    if not isinstance(negative, dict) or set(negative) - {"text", "id"} or "text" not in negative:
      _fail(where, f"{fwhere}[{query_lang!r}]: expected {{\"text\": str[, \"id\": str]}}, "
            f"found {negative!r:.80}")
    for key in negative:
      if not isinstance(negative[key], str) or not negative[key].strip():
        _fail(where, f"{fwhere}[{query_lang!r}]: {key!r} must be a non-empty string, found "
              f"{negative[key]!r:.80}")
    parsed[query_lang] = Negative(negative["text"], negative.get("id"))
  return parsed


def read_jsonl(path: str) -> list[ParallelExample]:
  """Reads a parallel-examples JSONL file; errors name the file and the 1-based line (and the
  byte offset of an undecodable byte; a byte-order mark is not part of the first record)."""
  hint = (" (data.path). Expected a JSONL file, one {\"id\", \"languages\"} object per line; see "
          "hybrid_jax/data/records.py.")
  examples: list[ParallelExample] = []
  first_line: dict[str, int] = {}
  for line_number, line in text_files.iter_lines(path, "Parallel-examples file", DataError, hint):
    where = f"{path}:{line_number}"
    if not line.strip():
      continue  # blank lines (e.g. a trailing newline) are allowed
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}): {line.strip()[:80]!r}"
                      ) from e
    example = parse_record(record, where)
    if example.id in first_line:
      _fail(where, f"duplicate id {example.id!r} (first seen on line {first_line[example.id]}); "
            "put all languages of one id in one record")
    first_line[example.id] = line_number
    examples.append(example)
  if not examples:
    raise DataError(f"{path}: no records (the file is empty)")
  return examples


def write_jsonl(path: str, examples: Iterable[ParallelExample]) -> int:
  """Writes examples one per line (UTF-8, not ASCII-escaped); returns the number written."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  count = 0
  with open(path, "w", encoding="utf-8") as f:
    for example in examples:
      f.write(json.dumps(example.to_json(), ensure_ascii=False) + "\n")
      count += 1
  return count


# --- in-memory corpus -----------------------------------------------------------------------------
@dataclasses.dataclass
class ParallelCorpus:
  """N question ids x K languages of texts; `None` marks a language an id does not have."""

  languages: tuple[str, ...]  # K codes; column order of the arrays below
  ids: list[str]  # N question ids
  queries: np.ndarray  # [N, K] object: str or None
  positives: np.ndarray  # [N, K] object: str or None (None exactly where queries is None)
  negatives: np.ndarray  # [N, K] object: str or None (may be None where the id exists)
  source: str = "<memory>"  # for messages: file or directory the corpus came from
  # The optional record fields; None when no example has any (see the module docstring).
  positive_ids: np.ndarray | None = None  # [N, K] object: passage id or None (its text)
  negative_ids: np.ndarray | None = None  # [N, K] object: passage id or None (from its text)
  # [N, K, K] object: [n, k, x] = the negative of rows (query in x, positive in k) or None.
  query_negatives: np.ndarray | None = None
  query_negative_ids: np.ndarray | None = None  # [N, K, K] object: their passage ids or None
  # [N] group keys: ids with one key share an article (lareqa.id_groups) and are split together.
  groups: list[str] | None = None

  @property
  def num_examples(self) -> int:
    return len(self.ids)

  @property
  def presence(self) -> np.ndarray:
    """[N, K] bool: id n exists in language k."""
    return np.not_equal(self.positives, None)

  def language_index(self, lang: str) -> int:
    return self.languages.index(lang)

  def examples_per_language(self) -> dict[str, int]:
    counts = self.presence.sum(axis=0)
    return {lang: int(c) for lang, c in zip(self.languages, counts)}

  def subset(self, rows: np.ndarray) -> "ParallelCorpus":
    """The corpus restricted to the given rows (order kept)."""
    rows = np.asarray(rows, dtype=np.int64)
    optional = {field: None if getattr(self, field) is None else getattr(self, field)[rows]
                for field in _OPTIONAL_ARRAYS}
    groups = None if self.groups is None else [self.groups[i] for i in rows]
    return ParallelCorpus(self.languages, [self.ids[i] for i in rows], self.queries[rows],
                          self.positives[rows], self.negatives[rows], self.source, **optional,
                          groups=groups)

  def _optional(self, field: str, *index):
    array = getattr(self, field)
    return None if array is None else array[index]

  def example(self, row: int) -> ParallelExample:
    langs = {}
    for k, lang in enumerate(self.languages):
      if self.positives[row, k] is not None:
        by_query = {}
        for x, query_lang in enumerate(self.languages):
          text = self._optional("query_negatives", row, k, x)
          if text is not None:
            by_query[query_lang] = Negative(text, self._optional("query_negative_ids", row, k, x))
        langs[lang] = LanguageTexts(self.queries[row, k], self.positives[row, k],
                                    self.negatives[row, k],
                                    self._optional("positive_ids", row, k),
                                    self._optional("negative_ids", row, k), by_query)
    return ParallelExample(self.ids[row], langs)

  def negative_table(self) -> tuple[np.ndarray, np.ndarray]:
    """(texts, passage ids) of the hard negatives, [N, C] object arrays (None: no negative or no
    id), one column per negative slot: C = K, column k for rows whose positive is in language k;
    with negatives by query language C = K * K, column k * K + x for rows (query x, positive k),
    which falls back to column k's negative where the record names none for x. `negative_column`
    maps a row's languages to its column."""
    k = len(self.languages)
    ids = self.negative_ids if self.negative_ids is not None else np.full(
        self.negatives.shape, None, dtype=object)
    if self.query_negatives is None:
      return self.negatives, ids
    has_own = np.not_equal(self.query_negatives, None)
    texts = np.where(has_own, self.query_negatives, self.negatives[:, :, None])  # [N, K, K]
    ids = np.where(has_own, self.query_negative_ids, ids[:, :, None])
    rows_exist = self.presence[:, :, None] & self.presence[:, None, :]  # the id has both languages
    texts = np.where(rows_exist, texts, None).reshape(len(self.ids), k * k)
    ids = np.where(rows_exist, ids, None).reshape(len(self.ids), k * k)
    return texts, ids

  def negative_column(self, query_lang: np.ndarray, passage_lang: np.ndarray) -> np.ndarray:
    """[b] int32 column of `negative_table` that holds the negative of each row."""
    passage_lang = np.asarray(passage_lang, np.int32)
    if self.query_negatives is None:
      return passage_lang
    return (passage_lang * len(self.languages) + np.asarray(query_lang, np.int32)).astype(np.int32)

  def iter_examples(self) -> Iterator[ParallelExample]:
    for row in range(self.num_examples):
      yield self.example(row)

  @classmethod
  def from_examples(cls, examples: Sequence[ParallelExample], languages: Sequence[str] | None = None,
                    source: str = "<memory>") -> "ParallelCorpus":
    """Builds the arrays; `languages` (default: all present, sorted) selects and orders columns.

    Ids that have none of the selected languages are dropped. An unknown code in `languages`
    is an error that lists the languages the source has.
    """
    present: dict[str, None] = {}
    for example in examples:
      for lang in example.languages:
        present.setdefault(lang)
    if languages:
      languages = tuple(languages)
      if len(set(languages)) != len(languages):
        raise DataError(f"data.languages lists a language twice: {list(languages)}")
      unknown = [lang for lang in languages if lang not in present]
      if unknown:
        raise DataError(
            f"data.languages names {unknown}, which no example in {source} has. Languages "
            f"present: {sorted(present)}. Fix data.languages (or leave it empty for all).")
    else:
      languages = tuple(sorted(present))
    column = {lang: k for k, lang in enumerate(languages)}
    kept = [e for e in examples if any(lang in column for lang in e.languages)]
    n, k = len(kept), len(languages)
    queries = np.full((n, k), None, dtype=object)
    positives = np.full((n, k), None, dtype=object)
    negatives = np.full((n, k), None, dtype=object)
    entries = [texts for e in kept for lang, texts in e.languages.items() if lang in column]
    # The optional arrays only when some entry uses them: a [N, K, K] array costs memory at scale.
    optional = {}
    if any(t.positive_id is not None for t in entries):
      optional["positive_ids"] = np.full((n, k), None, dtype=object)
    if any(t.negative_id is not None for t in entries):
      optional["negative_ids"] = np.full((n, k), None, dtype=object)
    if any(set(t.negatives_by_query_language) & set(column) for t in entries):
      optional["query_negatives"] = np.full((n, k, k), None, dtype=object)
      optional["query_negative_ids"] = np.full((n, k, k), None, dtype=object)
    for row, example in enumerate(kept):
      for lang, texts in example.languages.items():
        if lang not in column:
          continue
        c = column[lang]
        queries[row, c] = texts.query
        positives[row, c] = texts.positive
        negatives[row, c] = texts.negative
        if "positive_ids" in optional:
          optional["positive_ids"][row, c] = texts.positive_id
        if "negative_ids" in optional:
          optional["negative_ids"][row, c] = texts.negative_id
        if "query_negatives" in optional:
          for query_lang, negative in texts.negatives_by_query_language.items():
            if query_lang in column:
              optional["query_negatives"][row, c, column[query_lang]] = negative.text
              optional["query_negative_ids"][row, c, column[query_lang]] = negative.id
    return cls(languages, [e.id for e in kept], queries, positives, negatives, source, **optional)


_OPTIONAL_ARRAYS = ("positive_ids", "negative_ids", "query_negatives", "query_negative_ids")


def validation_ids_mask(ids: Sequence[str], fraction: float,
                        groups: Sequence[str] | None = None) -> np.ndarray:
  """[N] bool: the held-out ids, exactly round(fraction * N) of them; with `groups` ([N] keys),
  whole groups, ranked by a hash of their key, each taken when it brings the count closer to
  round(fraction * N) (within half of the largest group).

  Ids (groups) are ranked by a hash of the id (key) string alone, so the split depends neither on
  the file order nor on the data seed: runs that differ only in batch type or seed share their
  validation set.
  """
  if not 0.0 <= fraction < 1.0:
    raise DataError(f"data.validation_fraction must be in [0, 1), found {fraction}")
  num_validation = int(round(fraction * len(ids)))
  mask = np.zeros(len(ids), dtype=bool)
  if groups is None:
    keys = [hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest() for i in ids]
    order = sorted(range(len(ids)), key=lambda i: (keys[i], ids[i]))
    mask[order[:num_validation]] = True
    return mask
  if len(groups) != len(ids):
    raise ValueError(f"{len(groups)} group keys for {len(ids)} ids")
  members: dict[str, list[int]] = {}
  for row, key in enumerate(groups):
    members.setdefault(key, []).append(row)
  # Salted: unrelated to the held-out test split's group order (lareqa.HeldoutSplit).
  order = sorted(members, key=lambda g: (
      hashlib.blake2b(f"validation:{g}".encode("utf-8"), digest_size=8).digest(), g))
  # A group is taken when it brings the count closer to the target: whole articles are coarse
  # (XQuAD-R's hold ~25 ids each), so "until the target is reached" could overshoot by a large one.
  taken = 0
  for key in order:
    size = len(members[key])
    if abs(taken + size - num_validation) < abs(taken - num_validation):
      mask[members[key]] = True
      taken += size
  return mask


def split_by_id(corpus: ParallelCorpus, fraction: float) -> tuple[ParallelCorpus, ParallelCorpus]:
  """(train, validation) corpora; all languages of an id fall on the same side."""
  mask = validation_ids_mask(corpus.ids, fraction, corpus.groups)
  return corpus.subset(np.flatnonzero(~mask)), corpus.subset(np.flatnonzero(mask))
