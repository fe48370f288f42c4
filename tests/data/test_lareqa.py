"""LAReQA file parser: gold sentences, uids, format errors, and the real XQuAD-R / MLQA-R counts
of their SOURCE.md files; the candidate text shared by the training source and the eval collection."""

from __future__ import annotations

import json
import os

import pytest

from hybrid_jax.data import defaults
from hybrid_jax.data import lareqa
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


@pytest.mark.parametrize("dataset,counts,total_candidates", [
    ("xquad-r", XQUAD_R_COUNTS, 13014), ("mlqa-r", MLQA_R_COUNTS, 20534)])
def test_real_files_have_the_source_md_counts(dataset, counts, total_candidates):
  directory = os.path.join(lareqa.default_data_root(), dataset)
  parsed = lareqa.read_languages(directory)
  assert {lang: (len(p.questions), len(p.candidates)) for lang, p in parsed.items()} == counts
  assert sum(len(p.candidates) for p in parsed.values()) == total_candidates
  for p in parsed.values():  # every gold uid names a candidate of its own language
    uids = {c.uid for c in p.candidates}
    assert all(q.gold_uid in uids for q in p.questions)


@pytest.mark.parametrize("with_context", [False, True])
def test_training_passages_and_eval_candidates_are_one_functions_text(with_context, monkeypatch):
  """On real XQuAD-R, the training source's positives and the eval collection's candidates are
  lareqa.candidate_text of the same candidates, so a model is evaluated on the text it trained on."""
  directory = os.path.join(lareqa.default_data_root(), "xquad-r")
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
