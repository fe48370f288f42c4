"""TFDS builders for XQuAD-R and MLQA-R, prepared from the local shared data as manual_dir into a
temporary data_dir (never a download): counts, equality with the LAReQA reader, the tfds source."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from hybrid_jax.data import defaults
from hybrid_jax.data import lareqa
from hybrid_jax.data import locations
from hybrid_jax.data import passage_ids
from hybrid_jax.data import records
from hybrid_jax.data import sources
from hybrid_jax.data import tfds_builders
from hybrid_jax.models import presets

PREFIXES = presets.PAPER_PREFIXES

ROOT = locations.data_root()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def xquad(data_dir):
  builder = tfds_builders.builder("xquad_r", data_dir)
  tfds_builders.prepare(builder, ROOT)  # the parent folder: the builder finds xquad-r/ in it
  return builder


@pytest.fixture(scope="module")
def mlqa(data_dir):
  builder = tfds_builders.builder("mlqa_r", data_dir)
  tfds_builders.prepare(builder, os.path.join(ROOT, "mlqa-r"))  # the folder itself
  return builder


def _without_passage_ids(examples):
  return [records.ParallelExample(e.id, {
      lang: records.LanguageTexts(t.query, t.positive, t.negative)
      for lang, t in e.languages.items()}) for e in examples]


def _assert_same_as_lareqa_reader(examples, dataset):
  """The TFDS records hold the texts, not the passage ids; the ids derived from the texts
  (passage_ids.resolve) equal those of the reader's explicit ones."""
  reference = lareqa.training_examples(os.path.join(ROOT, dataset))
  assert examples == _without_passage_ids(reference)
  ours = passage_ids.resolve(records.ParallelCorpus.from_examples(examples))
  theirs = passage_ids.resolve(records.ParallelCorpus.from_examples(reference))
  assert np.array_equal(ours.positive, theirs.positive)
  assert np.array_equal(ours.negative, theirs.negative)


@pytest.mark.real_data
def test_xquad_r_records(xquad):
  assert xquad.info.splits["train"].num_examples == 1190
  examples = tfds_builders.read_examples(xquad)
  _assert_same_as_lareqa_reader(examples, "xquad-r")
  assert all(len(e.languages) == 11 for e in examples)
  assert xquad.info.full_name == "xquad_r/sentence/1.0.0"


@pytest.mark.real_data
def test_mlqa_r_records(mlqa):
  assert mlqa.info.splits["train"].num_examples == 1148
  examples = tfds_builders.read_examples(mlqa)
  _assert_same_as_lareqa_reader(examples, "mlqa-r")
  per_id = collections.Counter(len(e.languages) for e in examples)
  assert per_id == {4: 820, 3: 263, 2: 65}
  per_language = collections.Counter(lang for e in examples for lang in e.languages)
  assert per_language == {"ar": 517, "de": 512, "en": 1148, "es": 500, "hi": 507, "vi": 511,
                          "zh": 504}


@pytest.mark.real_data
def test_tfds_source_gives_the_same_corpus_as_the_lareqa_source(mlqa, data_dir):
  config = defaults.data_config(real_data=True, prefixes=PREFIXES)  # lareqa, mlqa-r
  config.languages = ("en", "de", "zh")
  reference = sources.load_corpus(config)
  config.source, config.path, config.tfds_data_dir = "tfds", "mlqa_r", data_dir
  corpus = sources.load_corpus(config)
  assert corpus.languages == reference.languages and sorted(corpus.ids) == sorted(reference.ids)
  # Row order may differ (the lareqa source orders ids by the selected languages' files).
  order = [reference.ids.index(i) for i in corpus.ids]
  np.testing.assert_array_equal(corpus.presence, reference.presence[order])
  assert np.array_equal(corpus.positives, reference.positives[order])
  assert corpus.source == f"TFDS mlqa_r ({data_dir})"


@pytest.mark.real_data
def test_with_context_config_is_prepared_on_demand(data_dir):
  config = defaults.data_config(real_data=True, prefixes=PREFIXES)
  config.passage_with_context = True
  reference = sources.load_corpus(config)
  config.source, config.path, config.tfds_data_dir = "tfds", "mlqa_r", data_dir
  config.tfds_manual_dir = ROOT
  corpus = sources.load_corpus(config)
  assert os.path.isdir(os.path.join(data_dir, "mlqa_r", "with_context", "1.0.0"))
  assert np.array_equal(corpus.positives, reference.positives)
  assert np.array_equal(corpus.negatives, reference.negatives)


def test_missing_manual_files_and_unknown_names_are_clear_errors(tmp_path):
  builder = tfds_builders.builder("xquad_r", str(tmp_path / "tfds"))
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "en.json").write_text("{}")
  with pytest.raises(records.DataError,
                     match=r"manual_dir '.*manual' holds neither the xquad-r files \['ar.json', .*"
                     r"found: \['en.json'\]"):
    tfds_builders.prepare(builder, str(tmp_path / "manual"))
  assert not (tmp_path / "tfds" / "xquad_r" / "sentence" / "1.0.0").exists()
  with pytest.raises(records.DataError, match=r"unknown LAReQA TFDS dataset 'squad'"):
    tfds_builders.builder("squad")


@pytest.mark.real_data
def test_command_line_reports_prepared_datasets(mlqa, data_dir, capsys):
  tfds_builders.main(["--datasets=mlqa_r", f"--data_dir={data_dir}"])
  assert "mlqa_r/sentence/1.0.0: 1148 ids" in capsys.readouterr().err
