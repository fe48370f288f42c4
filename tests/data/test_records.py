"""Parallel-examples JSONL format: round trip, in-memory corpus, id split, and errors that name the
file and line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from hybrid_jax.data import records

EXAMPLES = [
    records.ParallelExample("q1", {"en": records.LanguageTexts("who?", "him.", "not him."),
                                   "de": records.LanguageTexts("wer?", "er.")}),
    records.ParallelExample("q2", {"en": records.LanguageTexts("where?", "here.")}),
    records.ParallelExample("q3", {"fr": records.LanguageTexts("quand?", "hier.", "demain."),
                                   "de": records.LanguageTexts("wann?", "gestern.")}),
]


def _write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def test_jsonl_round_trip(tmp_path):
  path = str(tmp_path / "sub" / "examples.jsonl")
  assert records.write_jsonl(path, EXAMPLES) == 3
  lines = open(path, encoding="utf-8").read().splitlines()
  assert json.loads(lines[0]) == {"id": "q1", "languages": {
      "en": {"query": "who?", "positive": "him.", "negative": "not him."},
      "de": {"query": "wer?", "positive": "er."}}}
  assert records.read_jsonl(path) == EXAMPLES


def test_reader_accepts_integer_ids_meta_blank_lines_and_a_bom(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_bytes("\ufeff".encode("utf-8") + (
      '{"id": 7, "languages": {"zh-Hans": {"query": "谁?", "positive": "他。"}}, "meta": [1]}\n'
      "\n"
      '{"id": "8", "languages": {"en": {"query": "a", "positive": "b"}}}\n').encode("utf-8"))
  examples = records.read_jsonl(str(path))
  assert [e.id for e in examples] == ["7", "8"]
  assert examples[0].languages["zh-Hans"] == records.LanguageTexts("谁?", "他。")


GOOD = '{"id": "a", "languages": {"en": {"query": "q", "positive": "p"}}}'


@pytest.mark.parametrize("bad_line,message", [
    ('{"id": "b", "languages": {"en": {"query": "q", "positive": "p"}}',
     r"malformed JSON \(Expecting ',' delimiter"),
    ('{"languages": {"en": {"query": "q", "positive": "p"}}}', r"missing field 'id'"),
    ('{"id": "b"}', r"missing field 'languages'"),
    ('{"id": "b", "languages": {"en": {"query": "q"}}}',
     r"record 'b', language 'en': missing field 'positive'"),
    ('{"id": "b", "languages": {"en": {"query": "q", "postive": "p"}}}',
     r"record 'b', language 'en': unknown field\(s\) \['postive'\]"),
    ('{"id": "b", "langs": {}}', r"unknown field\(s\) \['langs'\]"),
    ('{"id": "b", "languages": {}}', r"record 'b': field 'languages' must be a non-empty object"),
    ('{"id": "b", "languages": {"en": {}}}', r"record 'b', language 'en': missing field 'query'"),
    ('{"id": "b", "languages": {"en": {"query": " ", "positive": "p"}}}',
     r"field 'query' must be a non-empty string"),
    ('{"id": "b", "languages": {"": {"query": "q", "positive": "p"}}}',
     r"language code '' is empty or contains whitespace"),
    ('{"id": "", "languages": {"en": {"query": "q", "positive": "p"}}}',
     r"field 'id' must be a non-empty string or an integer"),
    ('["a", "b"]', r"expected a JSON object"),
    (GOOD, r"duplicate id 'a' \(first seen on line 1\)"),
])
def test_bad_records_name_the_file_and_line(tmp_path, bad_line, message):
  path = _write_lines(tmp_path / "bad.jsonl", [GOOD, bad_line])
  with pytest.raises(records.DataError, match=rf"^{re.escape(path)}:2: (record 'b'.*: )?{message}"):
    records.read_jsonl(path)


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(records.DataError, match="does not exist"):
    records.read_jsonl(str(tmp_path / "nope.jsonl"))
  empty = _write_lines(tmp_path / "empty.jsonl", [])
  with pytest.raises(records.DataError, match="no records"):
    records.read_jsonl(empty)


def test_corpus_arrays_and_language_selection():
  corpus = records.ParallelCorpus.from_examples(EXAMPLES)
  assert corpus.languages == ("de", "en", "fr")
  assert corpus.ids == ["q1", "q2", "q3"]
  np.testing.assert_array_equal(corpus.presence, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])
  assert corpus.examples_per_language() == {"de": 2, "en": 2, "fr": 1}
  assert corpus.queries[2, 2] == "quand?" and corpus.negatives[0, 1] == "not him."
  assert corpus.negatives[0, 0] is None
  assert list(corpus.iter_examples()) == [
      EXAMPLES[0], EXAMPLES[1],
      records.ParallelExample("q3", {"de": EXAMPLES[2].languages["de"],
                                     "fr": EXAMPLES[2].languages["fr"]})]
  # Selecting languages orders the columns and drops ids with none of them.
  en_fr = records.ParallelCorpus.from_examples(EXAMPLES, ["fr", "en"])
  assert en_fr.languages == ("fr", "en") and en_fr.ids == ["q1", "q2", "q3"]
  fr_only = records.ParallelCorpus.from_examples(EXAMPLES, ["fr"])
  assert fr_only.ids == ["q3"]
  sub = corpus.subset(np.array([2, 0]))
  assert sub.ids == ["q3", "q1"] and sub.queries[1, 1] == "who?"


def test_unknown_or_repeated_language_in_config():
  with pytest.raises(records.DataError,
                     match=r"data.languages names \['xx'\], which no example in src.jsonl has. "
                     r"Languages present: \['de', 'en', 'fr'\]"):
    records.ParallelCorpus.from_examples(EXAMPLES, ["en", "xx"], source="src.jsonl")
  with pytest.raises(records.DataError, match="lists a language twice"):
    records.ParallelCorpus.from_examples(EXAMPLES, ["en", "en"])


def test_validation_split_is_by_id_exact_and_order_independent():
  ids = [f"id{i}" for i in range(1000)]
  mask = records.validation_ids_mask(ids, 0.1)
  assert mask.sum() == 100
  shuffled = list(np.random.default_rng(0).permutation(ids))
  shuffled_mask = records.validation_ids_mask(shuffled, 0.1)
  assert {i for i, m in zip(ids, mask) if m} == {i for i, m in zip(shuffled, shuffled_mask) if m}
  assert records.validation_ids_mask(ids, 0.0).sum() == 0
  # A larger fraction extends the held-out set (the ranking is fixed by the ids alone).
  assert np.all(records.validation_ids_mask(ids, 0.2)[mask])
  for fraction in (-0.1, 1.0):
    with pytest.raises(records.DataError, match=r"validation_fraction must be in \[0, 1\)"):
      records.validation_ids_mask(ids, fraction)


def test_split_by_id_keeps_all_languages_of_an_id_together():
  examples = [records.ParallelExample(f"q{i}", {"en": records.LanguageTexts(f"q{i}", f"p{i}"),
                                                "de": records.LanguageTexts(f"Q{i}", f"P{i}")})
              for i in range(50)]
  corpus = records.ParallelCorpus.from_examples(examples)
  train, validation = records.split_by_id(corpus, 0.2)
  assert len(validation.ids) == 10 and len(train.ids) == 40
  assert not set(train.ids) & set(validation.ids)
  for part in (train, validation):
    for row, qid in enumerate(part.ids):
      assert part.queries[row, part.language_index("en")] == qid


def test_grouped_validation_mask_takes_whole_groups_deterministically():
  ids = [f"q{i}" for i in range(200)]
  groups = [f"article{i // 7}" for i in range(200)]  # 29 groups of 7 (the last of 4)
  mask = records.validation_ids_mask(ids, 0.1, groups)
  for key in set(groups):
    members = [mask[i] for i, g in enumerate(groups) if g == key]
    assert all(members) or not any(members), key  # a group is never split
  # round(0.1 * 200) = 20 ids, give or take half a group.
  assert abs(mask.sum() - 20) <= 3.5
  # A pure function of (ids, groups): file order does not matter.
  order = np.random.default_rng(0).permutation(200)
  shuffled = records.validation_ids_mask([ids[i] for i in order], 0.1, [groups[i] for i in order])
  np.testing.assert_array_equal(shuffled, mask[order])
  assert records.validation_ids_mask(ids, 0.0, groups).sum() == 0
  # Groups of one id each give the same size as the plain split.
  assert records.validation_ids_mask(ids, 0.1, ids).sum() == 20
