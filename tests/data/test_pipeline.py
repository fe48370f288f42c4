"""TrainingData: tf.data batches equal the NumPy reference, exact resume, host slices, validation
batches, the training-start summary and errors raised before any batch is made."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from hybrid_jax import config_lib
from hybrid_jax.data import defaults
from hybrid_jax.data import pipeline
from hybrid_jax.data import records
from hybrid_jax.data import tokenization
from hybrid_jax.models import presets

PREFIXES = presets.PAPER_PREFIXES

BATCH = 16


def _small_config(**changes):
  config = defaults.data_config("hybrid", prefixes=PREFIXES)
  config.synthetic.num_entities = 32
  config.synthetic.num_relations = 8
  config.hard_negatives = True
  config.tf_threads = 2
  config.prefetch_batches = 2
  config.update(changes)
  return config


@pytest.fixture(scope="module")
def data() -> pipeline.TrainingData:
  return pipeline.TrainingData.from_config(_small_config())


def _take(data, count, **kwargs):
  return list(itertools.islice(data.train_batches(BATCH, **kwargs), count))


def _assert_batches_equal(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype == np.int32, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_tf_data_batches_equal_the_numpy_reference(data):
  batches = _take(data, 6, start_step=3)
  for step, batch in enumerate(batches, start=3):
    reference = data.host_batch(data.plan(step, BATCH))
    _assert_batches_equal(batch, reference)
  keys = set(pipeline.BATCH_KEYS) | set(pipeline.NEGATIVE_KEYS)
  assert set(batches[0]) == keys
  assert batches[0]["query_input_ids"].shape == (BATCH, 16)
  assert batches[0]["negative_input_ids"].shape == (BATCH, 24)
  assert {int(b["batch_type"][0]) for b in batches} <= {0, 1}


def test_host_batch_holds_the_tokenized_texts_of_the_plan(data):
  """Independent reference: tokenize the plan's texts directly with Tokenizer.encode."""
  tokenizer, corpus = data.tokenizer, data.corpus
  for step in range(4):
    plan = data.plan(step, BATCH)
    batch = data.host_batch(plan)
    queries = [corpus.queries[n, k] for n, k in zip(plan.example, plan.query_lang)]
    passages = [corpus.positives[n, k] for n, k in zip(plan.example, plan.passage_lang)]
    negatives = [corpus.negatives[n, k] for n, k in zip(plan.example, plan.passage_lang)]
    for prefix, texts, length, start in (("query", queries, 16, "Query: "),
                                         ("passage", passages, 24, "Passage: "),
                                         ("negative", negatives, 24, "Passage: ")):
      expected = tokenizer.encode(texts, length, prefix=start)
      np.testing.assert_array_equal(batch[f"{prefix}_input_ids"], expected.input_ids)
      np.testing.assert_array_equal(batch[f"{prefix}_attention_mask"], expected.attention_mask)
    # question_id: equal across rows exactly when the rows share a question id.
    ids = data.ids(plan)
    same_id = np.equal.outer(batch["question_id"], batch["question_id"])
    np.testing.assert_array_equal(same_id, np.equal.outer(ids, ids))
    np.testing.assert_array_equal(batch["query_lang"], plan.query_lang)
    assert np.all(batch["batch_type"] == plan.batch_type_id)


def test_resume_at_step_k_gives_the_tail_of_an_uninterrupted_run(data):
  full = _take(data, 8)
  resumed = _take(data, 3, start_step=5)
  for a, b in zip(full[5:], resumed):
    _assert_batches_equal(a, b)


@pytest.mark.parametrize("hosts", [2, 4, 8])
def test_host_slices_concatenate_to_the_global_batch(data, hosts):
  global_batches = _take(data, 3, start_step=10)
  per_host = [_take(data, 3, start_step=10, process_index=i, process_count=hosts)
              for i in range(hosts)]
  for step in range(3):
    for key in global_batches[step]:
      assert per_host[0][step][key].shape[0] == BATCH // hosts
      joined = np.concatenate([per_host[i][step][key] for i in range(hosts)])
      np.testing.assert_array_equal(joined, global_batches[step][key], err_msg=key)


def test_validation_batches_hold_only_held_out_ids(data):
  val = data.validation_batches(BATCH)
  assert len(val) == 16  # data.validation_batches
  train_ids = set(data.train_rows.tolist())
  for batch in val:
    assert not set(batch["question_id"].tolist()) & train_ids
    assert set(batch["question_id"].tolist()) <= set(data.validation_rows.tolist())
  assert [int(b["batch_type"][0]) for b in val] == [0, 1] * 8
  halves = [data.validation_batches(BATCH, process_index=i, process_count=2) for i in range(2)]
  for whole, first, second in zip(val, *halves):
    np.testing.assert_array_equal(np.concatenate([first["passage_input_ids"],
                                                  second["passage_input_ids"]]),
                                  whole["passage_input_ids"])
  no_validation = pipeline.TrainingData.from_config(_small_config(validation_fraction=0.0))
  assert no_validation.validation_batches(BATCH) == []


def test_summary_reports_languages_batch_types_and_steps_per_epoch(data):
  text = data.summary(BATCH)
  train_counts = data.corpus.presence[data.train_rows].sum(axis=0)
  val_counts = data.corpus.presence[data.validation_rows].sum(axis=0)
  for k, lang in enumerate(data.languages):
    row = re.search(rf"^\s+{lang}\s+{k}\s+(\d+)\s+(\d+)\s+([\d.]+)$", text, re.MULTILINE)
    assert row, (lang, text)
    assert (int(row[1]), int(row[2]), float(row[3])) == (train_counts[k], val_counts[k], 0.25)
  assert "mono 50.0% / xy 50.0% of batches" in text
  queries = int(train_counts.sum())
  assert f"steps per epoch {queries / BATCH:.1f}" in text and f"({queries} training" in text
  assert f"{len(data.train_rows)} train / {len(data.validation_rows)} validation" in text
  mono = pipeline.TrainingData.from_config(_small_config(batch_type="mixed", alpha=0.3,
                                                         hard_negatives=False))
  assert "every batch mixed: rows mono with p=0.3, else X-Y" in mono.summary(BATCH)
  xy = pipeline.TrainingData.from_config(_small_config(batch_type="xy", language_weighting="size",
                                                       hard_negatives=False))
  text = xy.summary(BATCH)
  assert "Batches: type xy: mono 0.0% / xy 100.0% of batches; language weighting size" in text
  assert "Batches: type hybrid (alpha 0.5): mono 50.0%" in data.summary(BATCH)


def test_full_experiment_config_runlocal():
  config = config_lib.build_config("xlmr-base", "hybrid", "runlocal")
  data = pipeline.TrainingData.from_config(config)
  assert data.tokenizer.vocab_size <= config.model.vocab_size
  assert data.corpus.num_examples == 614 and data.languages == ("lat", "grk", "cyr", "arm")
  config.model.vocab_size = 100
  with pytest.raises(tokenization.TokenizerError, match="emits token ids up to 426"):
    pipeline.TrainingData.from_config(config)


def test_errors_come_before_any_batch(tmp_path):
  examples = [records.ParallelExample(f"q{i}", {"en": records.LanguageTexts(f"q {i}", f"p {i}"),
                                                "de": records.LanguageTexts(f"Q {i}", f"P {i}", "N")})
              for i in range(40)]
  path = str(tmp_path / "pairs.jsonl")
  records.write_jsonl(path, examples)
  config = _small_config(source="jsonl", path=path)
  tokenizer = pipeline.TrainingData.from_config(_small_config()).tokenizer
  with pytest.raises(records.DataError,
                     match=r"hard_negatives=True but 40 ids in .*pairs.jsonl lack a 'negative' in "
                     r"some language, e.g. id 'q0' in \['en'\]"):
    pipeline.TrainingData.from_config(config, tokenizer=tokenizer)
  config.hard_negatives = False
  with pytest.raises(records.DataError, match="needs a tokenizer: set config.model.tokenizer"):
    pipeline.TrainingData.from_config(config)
  config.query_max_length = 1
  with pytest.raises(records.DataError, match="data.query_max_length must be >= 2"):
    pipeline.TrainingData.from_config(config, tokenizer=tokenizer)
  config.query_max_length = 8
  config.alpha = 1.2
  with pytest.raises(records.DataError, match=r"data.alpha must be in \[0, 1\]"):
    pipeline.TrainingData.from_config(config, tokenizer=tokenizer)
  config.alpha = 0.5
  data = pipeline.TrainingData.from_config(config, tokenizer=tokenizer)  # 36 train ids
  with pytest.raises(records.DataError, match="global batch size 40 cannot be filled"):
    data.train_batches(40)
  with pytest.raises(records.DataError, match="global batch size 40 cannot be filled"):
    data.summary(40)  # the trainer prints the summary before compiling
  with pytest.raises(records.DataError, match="not divisible by the number of processes 3"):
    data.train_batches(16, process_count=3)
  config.repeat_policy = "repeat"
  repeated = pipeline.TrainingData.from_config(config, tokenizer=tokenizer)
  batch = next(repeated.train_batches(40))
  assert len(set(batch["question_id"].tolist())) == 36  # every id once, then 4 repeats


def test_validation_batches_are_the_same_for_every_strategy():
  """Checkpoint choice by validation loss must be fair between X-X-mono, X-Y and hybrid: all
  validate on identical batches (data.validation_batch_type, default hybrid at alpha 0.5)."""
  batches = {}
  for batch_type, alpha in (("mono", 0.5), ("xy", 0.5), ("hybrid", 0.2), ("mixed", 0.7)):
    config = _small_config(batch_type=batch_type, alpha=alpha)
    batches[batch_type] = pipeline.TrainingData.from_config(config).validation_batches(BATCH)
  reference = batches["mono"]
  types = [int(b["batch_type"][0]) for b in reference]
  assert types == [0, 1] * (len(reference) // 2)  # mono, xy alternating
  for batch_type, found in batches.items():
    assert len(found) == len(reference)
    for a, b in zip(reference, found):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{batch_type} {key}")
  # "" = the run's own batch type (the former behaviour): a mono run validates on mono batches.
  config = _small_config(batch_type="mono", validation_batch_type="")
  own = pipeline.TrainingData.from_config(config).validation_batches(BATCH)
  assert {int(t) for b in own for t in b["batch_type"]} == {0}
  config.validation_batch_type = "bogus"
  with pytest.raises(records.DataError, match="data.validation_batch_type must be one of"):
    pipeline.TrainingData.from_config(config)


def test_negatives_by_query_language_reach_cross_lingual_rows(tmp_path):
  """A record's negatives_by_query_language: row (query X, positive Y) gets the negative the
  record gives for X, in the tf.data batches as in the NumPy reference; mono rows keep 'negative'."""
  plain = pipeline.TrainingData.from_config(_small_config())
  examples = []
  for example in plain.corpus.iter_examples():
    languages = {}
    for lang, texts in example.languages.items():
      by_query = {x: records.Negative(other.negative, f"{example.id}/{x}-negative")
                  for x, other in example.languages.items() if x != lang}
      languages[lang] = records.LanguageTexts(texts.query, texts.positive, texts.negative,
                                              negatives_by_query_language=by_query)
    examples.append(records.ParallelExample(example.id, languages))
  path = str(tmp_path / "by_query.jsonl")
  records.write_jsonl(path, examples)
  data = pipeline.TrainingData.from_config(_small_config(source="jsonl", path=path),
                                           tokenizer=plain.tokenizer)
  corpus = data.corpus
  assert data.negatives.num_languages == len(data.languages) ** 2
  batches = _take(data, 4, start_step=2)
  cross_rows = 0
  for step, batch in enumerate(batches, start=2):
    plan = data.plan(step, BATCH)
    _assert_batches_equal(batch, data.host_batch(plan))
    # The expected text: the query language's own negative on cross-lingual rows.
    expected = [corpus.negatives[n, x] for n, x in zip(plan.example, plan.query_lang)]
    encoded = data.tokenizer.encode(expected, 24, prefix="Passage: ")
    np.testing.assert_array_equal(batch["negative_input_ids"], encoded.input_ids)
    cross_rows += int(np.sum(plan.query_lang != plan.passage_lang))
    # Its passage id is that of the same text in the query language's plain slot.
    same_text = data.passage_ids.negative[plan.example, plan.query_lang * (len(data.languages) + 1)]
    np.testing.assert_array_equal(batch["negative_passage_id"], same_text)
  assert cross_rows >= BATCH  # X-Y batches were among them
