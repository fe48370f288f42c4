"""LAReQA file parser: gold sentences, uids, format errors, and the real XQuAD-R / MLQA-R counts
of their SOURCE.md files; the candidate text shared by the training source and the eval collection."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hybrid_jax.data import defaults
from hybrid_jax.data import lareqa
from hybrid_jax.data import locations
from hybrid_jax.data import records
from hybrid_jax.data import sources
from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.models import presets

PREFIXES = presets.PAPER_PREFIXES

# SOURCE.md tables: language -> (questions, candidate sentences).
XQUAD_R_COUNTS = {"ar": (1190, 1222), "de": (1190, 1276), "el": (1190, 1234), "en": (1190, 1180),
                  "es": (1190, 1215), "hi": (1190, 1244), "ru": (1190, 1219), "th": (1190, 852),
                  "tr": (1190, 1167), "vi": (1190, 1209), "zh": (1190, 1196)}
MLQA_R_COUNTS = {"ar": (517, 2545), "de": (512, 2362), "en": (1148, 6264), "es": (500, 1787),
                 "hi": (507, 2426), "vi": (511, 2828), "zh": (504, 2322)}


def _paragraph(sentences, qas):
  context = " ".join(sentences)
  breaks, start = [], 0
  for s in sentences:
    breaks.append([start, start + len(s)])
    start += len(s) + 1
  return {"context": context, "sentences": sentences, "sentence_breaks": breaks, "qas": qas}


def _write(directory, lang, articles):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{lang}.json"), "w", encoding="utf-8") as f:
    json.dump({"version": "1", "data": articles}, f)
  return os.path.join(directory, f"{lang}.json")


def test_gold_sentence_and_uids(tmp_path):
  directory = str(tmp_path)
  _write(directory, "en", [
      {"title": "A", "paragraphs": [
          _paragraph(["Cats purr.", "Dogs bark loudly."],
                     [{"id": "q1", "question": "What do dogs do?",
                       "answers": [{"text": "bark", "answer_start": 16}]}])]},
      {"title": "B", "paragraphs": [
          _paragraph(["One.", "Two.", "Three."],
                     [{"id": "q2", "question": "Which is last?",
                       "answers": [{"text": "Three", "answer_start": 10}]}])]}])
  _write(directory, "de", [{"title": "A", "paragraphs": [
      _paragraph(["Katzen schnurren."], [{"id": "q1", "question": "Was tun Hunde?",
                                          "answers": [{"text": "K", "answer_start": 0}]}])]}])
  assert lareqa.available_languages(directory) == ["de", "en"]
  en = lareqa.read_language(directory, "en")
  assert [c.uid for c in en.candidates] == ["en_1_0", "en_1_1", "en_2_0", "en_2_1", "en_2_2"]
  assert en.candidates[3].context == "One. Two. Three." and en.candidates[3].sentence == "Two."
  assert [(q.uid, q.gold_uid) for q in en.questions] == [("q1_en", "en_1_1"), ("q2_en", "en_2_2")]
  both = lareqa.read_languages(directory)
  assert sorted(both) == ["de", "en"] and both["de"].questions[0].gold_uid == "de_1_0"


def test_format_errors_name_the_file_and_place(tmp_path):
  directory = str(tmp_path)
  with pytest.raises(lareqa.LareqaFormatError, match="does not exist"):
    lareqa.available_languages(str(tmp_path / "missing"))
  with pytest.raises(lareqa.LareqaFormatError, match=r"No <lang>.json files"):
    lareqa.available_languages(directory)
  path = _write(directory, "en", [{"title": "A", "paragraphs": [
      _paragraph(["A b.", "C d."], [{"id": "q", "question": "?",
                                     "answers": [{"text": " ", "answer_start": 4}]}])]}])
  with pytest.raises(lareqa.LareqaFormatError,
                     match=rf"{path}: data\[0\].paragraphs\[0\].qas\[0\]: answer_start 4 falls in "
                     r"0 sentence spans"):
    lareqa.read_language(directory, "en")
  bad = _paragraph(["A."], [])
  del bad["sentence_breaks"]
  _write(directory, "en", [{"title": "A", "paragraphs": [bad]}])
  with pytest.raises(lareqa.LareqaFormatError, match=r"paragraphs\[0\]: missing field 'sentence_breaks'"):
    lareqa.read_language(directory, "en")
  with open(os.path.join(directory, "en.json"), "w") as f:
    f.write('{"data": [')
  with pytest.raises(lareqa.LareqaFormatError, match=r"en.json: cannot read as JSON"):
    lareqa.read_language(directory, "en")
  with pytest.raises(lareqa.LareqaFormatError, match=r"Language 'xx' has no file .*present.*\['en'\]"):
    lareqa.read_language(directory, "xx")


@pytest.mark.real_data
@pytest.mark.parametrize("dataset,counts,total_candidates", [
    ("xquad-r", XQUAD_R_COUNTS, 13014), ("mlqa-r", MLQA_R_COUNTS, 20534)])
def test_real_files_have_the_source_md_counts(dataset, counts, total_candidates):
  directory = os.path.join(locations.data_root(), dataset)
  parsed = lareqa.read_languages(directory)
  assert {lang: (len(p.questions), len(p.candidates)) for lang, p in parsed.items()} == counts
  assert sum(len(p.candidates) for p in parsed.values()) == total_candidates
  for p in parsed.values():  # every gold uid names a candidate of its own language
    uids = {c.uid for c in p.candidates}
    assert all(q.gold_uid in uids for q in p.questions)


@pytest.mark.real_data
@pytest.mark.parametrize("with_context", [False, True])
def test_training_passages_and_eval_candidates_are_one_functions_text(with_context, monkeypatch):
  """On real XQuAD-R, the training source's positives and the eval collection's candidates are
  lareqa.candidate_text of the same candidates, so a model is evaluated on the text it trained on."""
  directory = os.path.join(locations.data_root(), "xquad-r")
  parsed = lareqa.read_languages(directory)
  expected = {c.uid: lareqa.candidate_text(c, with_context)
              for part in parsed.values() for c in part.candidates}
  if with_context:  # LAReQA's encoding: sentence first, then its paragraph
    candidate = parsed["en"].candidates[0]
    assert expected[candidate.uid] == f"{candidate.sentence} {candidate.context}"
  config = defaults.data_config(real_data=True, prefixes=PREFIXES)
  config.path, config.passage_with_context = "xquad-r", with_context

  def training_positives(corpus):  # gold uid of every (question id, language) -> its positive
    row = {qid: i for i, qid in enumerate(corpus.ids)}
    return {q.gold_uid: corpus.positives[row[q.id], corpus.language_index(lang)]
            for lang, part in parsed.items() for q in part.questions}

  def eval_candidates(collection):
    return dict(zip(collection.candidate_uids, collection.candidate_texts))

  positives = training_positives(sources.load_corpus(config))
  assert positives == {uid: expected[uid] for uid in positives}
  assert eval_candidates(collection_lib.from_lareqa(directory, candidate_context=with_context)) \
      == expected
  # Not only equal today: both paths call that one function (a marker text reaches both).
  monkeypatch.setattr(lareqa, "candidate_text", lambda c, context: f"<{c.uid} {context}>")
  marked = {uid: f"<{uid} {with_context}>" for uid in expected}
  positives = training_positives(sources.load_corpus(config))
  assert positives == {uid: marked[uid] for uid in positives}
  assert eval_candidates(collection_lib.from_lareqa(directory, candidate_context=with_context)) \
      == marked


# --- held-out test part (HeldoutSplit) --------------------------------------------------------
def _texts_of(examples):
  out = set()
  for example in examples:
    for texts in example.languages.values():
      out.update(t for t in (texts.query, texts.positive, texts.negative) if t is not None)
  return out


@pytest.mark.real_data
@pytest.mark.parametrize("dataset,unit", [("mlqa-r", "article"), ("xquad-r", "article"),
                                          ("xquad-r", "paragraph")])
def test_heldout_part_shares_no_article_and_no_text_with_training(dataset, unit):
  """On the real files: the test part is whole articles (paragraphs) in every language, about
  the asked share of ids, and training sees none of its questions, sentences or negatives."""
  directory = os.path.join(locations.data_root(), dataset)
  split = lareqa.HeldoutSplit(0.2, unit)
  test_ids = lareqa.heldout_ids(directory, split)
  parsed = lareqa.read_languages(directory)
  all_ids = {q.id for p in parsed.values() for q in p.questions}
  assert 0.2 <= len(test_ids) / len(all_ids) < 0.3  # whole groups: at least the share asked
  test = lareqa.select_part(parsed, test_ids, "test", unit)
  train = lareqa.select_part(parsed, test_ids, "train", unit)
  key = (lambda c: c.article) if unit == "article" else (lambda c: c.paragraph)
  for lang in parsed:
    # Parts partition the file; no article (paragraph) is on both sides.
    assert len(test[lang].questions) + len(train[lang].questions) == len(parsed[lang].questions)
    assert len(test[lang].candidates) + len(train[lang].candidates) == len(
        parsed[lang].candidates)
    assert not {key(c) for c in test[lang].candidates} & {key(c) for c in train[lang].candidates}
    test_uids = {c.uid for c in test[lang].candidates}
    assert all(q.gold_uid in test_uids for q in test[lang].questions)
    assert {q.id for q in test[lang].questions} <= test_ids
  examples = lareqa.training_examples(directory, heldout=split)
  assert not {e.id for e in examples} & test_ids
  assert len({e.id for e in examples}) == len(all_ids - test_ids)
  test_texts = ({c.sentence for p in test.values() for c in p.candidates}
                | {q.question for p in test.values() for q in p.questions})
  train_sentences = {c.sentence for p in train.values() for c in p.candidates}
  # Only a few one-token fragments ("I.", "[citation needed]") repeat in other articles.
  shared = _texts_of(examples) & test_texts
  assert shared <= train_sentences and all(len(t) < 20 for t in shared), sorted(shared)[:5]


@pytest.mark.real_data
def test_heldout_split_is_deterministic_and_seeded():
  directory = os.path.join(locations.data_root(), "mlqa-r")
  first = lareqa.heldout_ids(directory, lareqa.HeldoutSplit(0.2))
  # Another process (no cache, another hash seed) holds out the same ids.
  code = ("import sys; from hybrid_jax.data import lareqa; print(' '.join(sorted("
          "lareqa.heldout_ids(sys.argv[1], lareqa.HeldoutSplit(0.2)))))")
  other_process = subprocess.run([sys.executable, "-c", code, directory], capture_output=True,
                                 text=True, check=True, env={**os.environ,
                                                             "PYTHONHASHSEED": "123"}).stdout
  assert other_process.split() == sorted(first)
  other = lareqa.heldout_ids(directory, lareqa.HeldoutSplit(0.2, seed=1))
  assert other != first and abs(len(other) - len(first)) < 25
  assert lareqa.heldout_ids(directory, lareqa.HeldoutSplit(0.0)) == frozenset()
  with pytest.raises(lareqa.LareqaFormatError, match="heldout_unit must be one of"):
    lareqa.heldout_ids(directory, lareqa.HeldoutSplit(0.2, "chapter"))
  with pytest.raises(lareqa.LareqaFormatError, match=r"heldout_fraction must be in \[0, 1\)"):
    lareqa.heldout_ids(directory, lareqa.HeldoutSplit(1.0))


def test_heldout_groups_follow_shared_articles_across_languages(tmp_path):
  """Two ids that share an article in one language are held out together, even where each has
  an article of its own in another language."""
  directory = str(tmp_path)
  qa = lambda i: {"id": i, "question": f"q {i}?", "answers": [{"answer_start": 0}]}
  # en: q1 and q2 share one article; de: each has its own. q3 stands alone everywhere.
  _write(directory, "en", [{"paragraphs": [_paragraph(["a1 x.", "a2 y."], [qa("q1")]),
                                           _paragraph(["b1 x."], [qa("q2")])]},
                           {"paragraphs": [_paragraph(["c1 x."], [qa("q3")])]}])
  _write(directory, "de", [{"paragraphs": [_paragraph(["d1 x."], [qa("q1")])]},
                           {"paragraphs": [_paragraph(["e1 x."], [qa("q2")])]},
                           {"paragraphs": [_paragraph(["f1 x."], [qa("q3")])]}])
  for seed in range(8):
    test = lareqa.heldout_ids(directory, lareqa.HeldoutSplit(0.3, seed=seed))
    assert test in ({"q1", "q2"}, {"q3"})  # never q1 without q2
    parsed = lareqa.read_languages(directory)
    train = lareqa.select_part(parsed, test, "train")
    # No sentence of a test article is a training negative (the fallback neighbour included).
    examples = lareqa.training_examples(directory, heldout=lareqa.HeldoutSplit(0.3, seed=seed))
    test_sentences = {c.sentence for p in lareqa.select_part(parsed, test, "test").values()
                      for c in p.candidates}
    assert not _texts_of(examples) & test_sentences
    assert {e.id for e in examples} == {"q1", "q2", "q3"} - test
    assert train


@pytest.mark.real_data
def test_heldout_training_source_and_errors(tmp_path):
  config = defaults.data_config(real_data=True, prefixes=PREFIXES)
  config.heldout_fraction = 0.2
  corpus = sources.load_corpus(config)
  test_ids = lareqa.heldout_ids(os.path.join(locations.data_root(), "mlqa-r"),
                                lareqa.HeldoutSplit(0.2))
  assert not set(corpus.ids) & test_ids and len(corpus.ids) == 1148 - len(test_ids)
  assert "train part: 0.2 of the ids held out by article" in corpus.source
  config.source, config.path = "jsonl", str(tmp_path / "x.jsonl")
  with pytest.raises(records.DataError, match="only data.source='lareqa' knows"):
    sources.load_corpus(config)
  with pytest.raises(lareqa.LareqaFormatError, match="needs a held-out split"):
    lareqa.read_part(os.path.join(locations.data_root(), "mlqa-r"), None, None, "test")


@pytest.mark.real_data
@pytest.mark.parametrize("dataset", ["xquad-r", "mlqa-r"])
def test_article_validation_split_trains_on_no_validation_gold_sentence(dataset):
  """The study's setting (20% held out by article, 10% validation): split by article
  (data.validation_unit auto = article), no validation gold sentence is a training positive or
  hard negative; split by id, many are (the leak protocol v1 had)."""
  config = defaults.data_config(real_data=True, prefixes=PREFIXES)
  config.path, config.heldout_fraction = dataset, 0.2
  shared = {}
  for unit in ("article", "id"):
    config.validation_unit = unit
    corpus = sources.load_corpus(config)
    validation = sources.validation_mask(corpus, config)
    if unit == "article":  # whole groups: within half of the largest one
      sizes = collections.Counter(corpus.groups)
      assert abs(validation.sum() - round(0.1 * len(corpus.ids))) <= max(sizes.values()) / 2
      print(dataset, len(corpus.ids), "ids,", len(sizes), "groups, largest", max(sizes.values()),
            "-> validation", validation.sum())
    else:
      assert validation.sum() == round(0.1 * len(corpus.ids))
    uids = lambda rows, field: {u for u in getattr(corpus, field)[rows].ravel() if u is not None}
    trained = uids(~validation, "positive_ids") | uids(~validation, "negative_ids")
    shared[unit] = sum(bool(uids(np.flatnonzero(validation)[[i]], "positive_ids") & trained)
                       for i in range(validation.sum()))
  assert shared["article"] == 0
  assert shared["id"] >= (50 if dataset == "xquad-r" else 1), shared
  config.validation_unit = "auto"
  assert sources.validation_unit(config) == "article"
  config.validation_unit = "chapter"
  with pytest.raises(records.DataError, match="validation_unit must be one of"):
    sources.load_corpus(config)
