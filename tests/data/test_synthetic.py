"""Synthetic parallel QA data: disjoint scripts/vocabularies per language over one shared set of
facts, determinism from the seed, coverage, held-out test ids, its tokenizer and LAReQA export."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hybrid_jax.data import defaults
from hybrid_jax.data import lareqa
from hybrid_jax.data import records
from hybrid_jax.data import synthetic
from hybrid_jax.data import tokenization

SPEC = synthetic.SyntheticSpec()  # the defaults of config.data.synthetic


def _words(example: records.ParallelExample, lang: str) -> list[str]:
  texts = example.languages[lang]
  return f"{texts.query} {texts.positive} {texts.negative}".split()


@pytest.fixture(scope="module")
def examples():
  return synthetic.all_examples(SPEC)


def test_spec_matches_the_config_defaults():
  assert synthetic.SyntheticSpec.from_config(defaults.synthetic_config()) == SPEC
  assert SPEC.vocab_size == 427 <= 512  # fits the "tiny" preset's embedding table
  with pytest.raises(records.DataError, match=r"unknown field\(s\) \['langs'\]"):
    synthetic.SyntheticSpec.from_config({"langs": 3})


@pytest.mark.parametrize("field,value,message", [
    ("num_languages", 6, r"num_languages must be in \[1, 5\]"),
    ("num_entities", 1, "num_entities must be >= 2"),
    ("coverage", 1.5, r"coverage must be in \[0, 1\]"),
    ("test_fraction", 1.0, r"test_fraction must be in \[0, 1\)"),
])
def test_invalid_spec(field, value, message):
  with pytest.raises(records.DataError, match=message):
    synthetic.SyntheticSpec(**{field: value}).validate()


def test_each_language_has_its_own_script_and_no_shared_words(examples):
  vocabularies = {lang: set() for lang in SPEC.languages}
  for example in examples:
    for lang in example.languages:
      vocabularies[lang].update(_words(example, lang))
  for lang, words in vocabularies.items():
    consonants, vowels = synthetic.SCRIPTS[lang]
    alphabet = set(consonants + vowels)
    assert all(set(word) <= alphabet for word in words), lang
  scripts = [set("".join(synthetic.SCRIPTS[lang])) for lang in SPEC.languages]
  for i in range(len(scripts)):
    for j in range(i + 1, len(scripts)):
      assert not scripts[i] & scripts[j]  # disjoint alphabets, hence no shared token
  # Every language uses its whole lexicon: 64 entities + 12 relations + <= 24 values + 5 function.
  assert all(90 <= len(words) <= 105 for words in vocabularies.values())


def test_languages_express_the_same_facts(tmp_path, examples):
  """The answer (value) of an id is the same value index in every language it exists in."""
  paths = synthetic.write_lareqa_dir(str(tmp_path), SPEC, ids="all")
  assert [os.path.basename(p) for p in paths] == [f"{lang}.json" for lang in SPEC.languages]
  value_index = {}
  for k, lang in enumerate(SPEC.languages):
    lexicon_values = synthetic.lexicon(SPEC, k).values
    with open(tmp_path / f"{lang}.json", encoding="utf-8") as f:
      for article in json.load(f)["data"]:
        for paragraph in article["paragraphs"]:
          for qa in paragraph["qas"]:
            answer = qa["answers"][0]
            assert paragraph["context"][answer["answer_start"]:].startswith(answer["text"])
            value_index.setdefault(qa["id"], {})[lang] = lexicon_values.index(answer["text"])
  assert len(value_index) == SPEC.num_entities * SPEC.num_relations
  multilingual = [v for v in value_index.values() if len(v) >= 2]
  assert len(multilingual) > 700
  assert all(len(set(v.values())) == 1 for v in value_index.values())
  # The facts vary: all values are used, so a passage cannot be guessed from the relation alone.
  assert len({next(iter(v.values())) for v in value_index.values()}) == SPEC.num_values


def test_monolingual_pairs_share_entity_and_relation_words(examples):
  for example in examples[:100]:
    for lang, texts in example.languages.items():
      query, positive, negative = (set(t.split()) for t in (texts.query, texts.positive,
                                                           texts.negative))
      assert len(query & positive) == 2  # the entity and the relation word
      assert len(query & negative) == 1  # hard negative: same entity, another relation
      assert positive != negative


def test_coverage_and_held_out_test_ids(examples):
  presence = records.ParallelCorpus.from_examples(examples, SPEC.languages).presence
  assert presence[:, 0].all()  # language 0 has every id
  n = len(examples)
  for k in range(1, SPEC.num_languages):
    share = presence[:, k].mean()
    sigma = np.sqrt(SPEC.coverage * (1 - SPEC.coverage) / n)
    assert abs(share - SPEC.coverage) < 4 * sigma, (k, share)
  train = {e.id for e in synthetic.training_examples(SPEC)}
  test = set(synthetic.test_ids(SPEC))
  assert len(test) == round(SPEC.test_fraction * n) == 154
  assert not train & test and len(train | test) == n


def test_deterministic_from_the_seed():
  again = synthetic.SyntheticSpec()
  assert synthetic.training_examples(again) == synthetic.training_examples(SPEC)
  assert (synthetic.build_tokenizer(again).hf_tokenizer.to_str()
          == synthetic.build_tokenizer(SPEC).hf_tokenizer.to_str())
  other = synthetic.all_examples(synthetic.SyntheticSpec(seed=1))
  first = synthetic.all_examples(SPEC)
  assert [e.id for e in other] == [e.id for e in first]
  different = sum(a.languages["lat"] != b.languages["lat"] for a, b in zip(first, other))
  assert different == len(first)  # a new seed gives new words everywhere


def test_tokenizer_covers_every_text_without_unknown_tokens(examples):
  tokenizer = synthetic.build_tokenizer(SPEC)
  assert tokenizer.vocab_size == SPEC.vocab_size and tokenizer.pad_token_id == 0
  unk = tokenizer.hf_tokenizer.token_to_id("[UNK]")
  queries = [t.query for e in examples for t in e.languages.values()]
  passages = [t.positive for e in examples for t in e.languages.values()]
  for texts, prefix in ((queries, "Query: "), (passages, "Passage: ")):
    batch = tokenizer.encode(texts, max_length=16, prefix=prefix)
    assert not np.any(batch.input_ids == unk)
    assert batch.lengths.max() <= 9  # [CLS] prefix 4-5 words [SEP]: fits the runlocal lengths
  ids = tokenizer.encode(["Query: " + queries[0]], max_length=16).input_ids[0]
  assert tokenizer.id_to_token(int(ids[0])) == "[CLS]" and tokenizer.id_to_token(int(ids[1])) == "Query:"


def test_cli_writes_corpus_tokenizer_and_lareqa_test_files(tmp_path):
  out = str(tmp_path / "syn")
  synthetic.main(["--output_dir", out, "--num_entities", "8", "--num_relations", "4",
                  "--num_languages", "3"])
  spec = synthetic.SyntheticSpec(num_entities=8, num_relations=4, num_languages=3)
  assert records.read_jsonl(os.path.join(out, "examples.jsonl")) == synthetic.training_examples(spec)
  assert tokenization.Tokenizer.from_dir(os.path.join(out, "tokenizer")).vocab_size == spec.vocab_size
  parsed = lareqa.read_languages(os.path.join(out, "lareqa"))
  assert sorted(parsed) == sorted(spec.languages)
  assert {q.id for q in parsed["lat"].questions} == set(synthetic.test_ids(spec))
