"""Data sources -> ParallelCorpus: synthetic, JSONL and LAReQA (the real XQuAD-R / MLQA-R files),
and the guarantee that MLQA-R ids are only ever paired in the languages their files hold."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

from hybrid_jax.data import defaults
from hybrid_jax.data import lareqa
from hybrid_jax.data import locations
from hybrid_jax.data import records
from hybrid_jax.data import sampler as sampler_lib
from hybrid_jax.data import sources
from hybrid_jax.models import presets
import train_helpers

PREFIXES = presets.PAPER_PREFIXES

DATA_ROOT = locations.data_root()


def _raw_id_languages(dataset: str) -> set[tuple[str, str]]:
  """(question id, language) pairs read straight from the JSON files: the independent reference."""
  pairs = set()
  directory = os.path.join(DATA_ROOT, dataset)
  for name in os.listdir(directory):
    if name.endswith(".json"):
      with open(os.path.join(directory, name), encoding="utf-8") as f:
        for article in json.load(f)["data"]:
          for paragraph in article["paragraphs"]:
            pairs.update((qa["id"], name[:-5]) for qa in paragraph["qas"])
  return pairs


@pytest.fixture(scope="module")
def mlqa_config():
  return defaults.data_config("hybrid", real_data=True, prefixes=PREFIXES)


@pytest.fixture(scope="module")
def mlqa_corpus(mlqa_config):
  return sources.load_corpus(mlqa_config)


@pytest.mark.real_data
def test_default_real_data_config_reads_mlqa_r_with_the_source_md_counts(mlqa_corpus):
  assert mlqa_corpus.source == os.path.join(DATA_ROOT, "mlqa-r")
  assert mlqa_corpus.languages == ("ar", "de", "en", "es", "hi", "vi", "zh")
  assert mlqa_corpus.num_examples == 1148
  assert mlqa_corpus.examples_per_language() == {
      "ar": 517, "de": 512, "en": 1148, "es": 500, "hi": 507, "vi": 511, "zh": 504}
  per_id = collections.Counter(mlqa_corpus.presence.sum(axis=1).tolist())
  assert per_id == {4: 820, 3: 263, 2: 65}  # SOURCE.md: languages per id
  assert int(mlqa_corpus.presence.sum()) == 4199


@pytest.mark.real_data
def test_xquad_r_is_fully_parallel():
  config = defaults.data_config(real_data=True, prefixes=PREFIXES)
  config.path = "xquad-r"
  corpus = sources.load_corpus(config)
  assert corpus.num_examples == 1190 and len(corpus.languages) == 11
  assert corpus.presence.all()
  # Positives and hard negatives are different sentences; every cell has a negative.
  assert np.all(np.not_equal(corpus.negatives, None))
  assert not np.any(corpus.negatives == corpus.positives)


@pytest.mark.real_data
@pytest.mark.parametrize("batch_type,alpha", [("mono", 0.5), ("xy", 0.5), ("mixed", 0.5),
                                              ("hybrid", 0.5)])
def test_mlqa_r_ids_are_only_paired_in_languages_they_have(mlqa_config, mlqa_corpus, batch_type,
                                                           alpha):
  reference = _raw_id_languages("mlqa-r")
  assert len(reference) == 4199
  config = mlqa_config.copy_and_resolve_references()
  config.batch_type, config.alpha = batch_type, alpha
  validation = sources.validation_mask(mlqa_corpus, config)
  sampler = sampler_lib.BatchSampler.from_config(config, mlqa_corpus.presence,
                                                 mlqa_corpus.languages,
                                                 rows=np.flatnonzero(~validation))
  pairs = set()
  cross = 0
  for step in range(300):
    plan = sampler.plan(step, 64)
    for n, q, p in zip(plan.example, plan.query_lang, plan.passage_lang):
      qid = mlqa_corpus.ids[n]
      pairs.add((qid, mlqa_corpus.languages[q]))
      pairs.add((qid, mlqa_corpus.languages[p]))
      cross += q != p
    if plan.batch_type == "xy":
      assert np.all(plan.query_lang != plan.passage_lang)
  assert pairs <= reference, sorted(pairs - reference)[:5]
  assert len(pairs) > 2000  # the check covered a large part of the data
  if batch_type != "mono":
    assert cross > 0


def test_passage_with_context_and_hard_negatives(tmp_path):
  directory = train_helpers.write_lareqa_neighbour_case(str(tmp_path))
  plain = {e.id: e.languages["en"] for e in lareqa.training_examples(directory)}
  # Hard negative: the other sentence of the paragraph; a one-sentence paragraph wraps around.
  # Every sentence is named by its candidate uid, so a negative that is another question's gold
  # sentence carries that gold cell's passage id.
  assert plain["q1"] == records.LanguageTexts("Dogs?", "Dogs bark.", "Cats purr.", "en_1_1",
                                              "en_1_0")
  assert plain["q2"] == records.LanguageTexts("Cats?", "Cats purr.", "Dogs bark.", "en_1_0",
                                              "en_1_1")
  assert plain["q3"] == records.LanguageTexts("Birds?", "Birds sing.", "Cats purr.", "en_2_0",
                                              "en_1_0")
  context = {e.id: e.languages["en"]
             for e in lareqa.training_examples(directory, with_context=True)}
  assert context["q1"].positive == "Dogs bark. Cats purr. Dogs bark."
  assert context["q3"].negative == "Cats purr. Cats purr. Dogs bark."


def test_duplicate_question_id_in_a_lareqa_file(tmp_path):
  with open(tmp_path / "en.json", "w") as f:
    json.dump({"data": [{"paragraphs": [
        {"context": "A.", "sentences": ["A."], "sentence_breaks": [[0, 2]],
         "qas": [{"id": "q", "question": "?", "answers": [{"answer_start": 0}]},
                 {"id": "q", "question": "?", "answers": [{"answer_start": 0}]}]}]}]}, f)
  with pytest.raises(records.DataError, match=r"en.json: question id 'q' occurs twice"):
    lareqa.training_examples(str(tmp_path))


@pytest.mark.real_data
def test_lareqa_config_errors(mlqa_config):
  config = mlqa_config.copy_and_resolve_references()
  config.languages = ("en", "el")
  with pytest.raises(records.DataError,
                     match=r"data.languages names \['el'\], which .*mlqa-r has no <lang>.json for. "
                     r"Languages present: \['ar', 'de', 'en', 'es', 'hi', 'vi', 'zh'\]"):
    sources.load_corpus(config)
  config.languages = ("de", "en")
  corpus = sources.load_corpus(config)
  assert corpus.languages == ("de", "en") and corpus.num_examples == 1148
  config.path = ""
  with pytest.raises(records.DataError, match="data.source='lareqa' needs data.path"):
    sources.load_corpus(config)
  config.source = "csv"
  with pytest.raises(records.DataError, match=r"data.source must be one of .*found 'csv'"):
    sources.load_corpus(config)


def test_jsonl_source_and_relative_paths(tmp_path, monkeypatch):
  examples = [records.ParallelExample(f"q{i}", {"en": records.LanguageTexts(f"q{i}", f"p{i}"),
                                                "de": records.LanguageTexts(f"Q{i}", f"P{i}")})
              for i in range(5)]
  records.write_jsonl(str(tmp_path / "pairs.jsonl"), examples)
  monkeypatch.setenv(locations.DATA_ENV_VAR, str(tmp_path))
  config = defaults.data_config(prefixes=PREFIXES)
  config.source, config.path = "jsonl", "pairs.jsonl"  # relative: found under $HYBRID_JAX_DATA
  corpus = sources.load_corpus(config)
  assert corpus.source == str(tmp_path / "pairs.jsonl")
  assert corpus.languages == ("de", "en") and corpus.ids == [f"q{i}" for i in range(5)]
  config.languages = ("en", "fr")
  with pytest.raises(records.DataError, match=r"names \['fr'\].*Languages present: \['de', 'en'\]"):
    sources.load_corpus(config)
  config.path = "nowhere.jsonl"
  with pytest.raises(records.DataError, match="'nowhere.jsonl' does not exist"):
    sources.load_corpus(config)


def test_synthetic_source_respects_language_selection():
  config = defaults.data_config(prefixes=PREFIXES)
  corpus = sources.load_corpus(config)
  assert corpus.languages == ("lat", "grk", "cyr", "arm")  # spec order, not alphabetical
  config.languages = ("cyr", "lat")
  corpus = sources.load_corpus(config)
  assert corpus.languages == ("cyr", "lat")
  config.languages = ("geo",)  # exists only with num_languages = 5
  with pytest.raises(records.DataError, match=r"names \['geo'\]"):
    sources.load_corpus(config)
