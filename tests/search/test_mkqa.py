"""MKQA: the official file format, the BGE-M3 filter, DPR-style answer matching, answer recall
against an independent reference, and clear errors for malformed lines."""

from __future__ import annotations

import gzip
import json
import os
import unicodedata

import numpy as np
import pytest

from hybrid_jax.eval import embeddings_io
from hybrid_jax.eval import report
from hybrid_jax.eval import runner
from hybrid_jax.search import mkqa

LANGS = ("de", "en", "ja")
NUM_DOCS, DIM = 150, 8


def _answer(kind, text, aliases=()):
  return {"type": kind, "entity": "Q1", "text": text, "aliases": list(aliases)}


# (answers per language, or one list for every language): the official answer types.
EXAMPLES = [
    {"en": [_answer("entity", "United States", ["U.S.", "USA"])],
     "de": [_answer("entity", "Vereinigte Staaten", ["USA"])],
     "ja": [_answer("entity", "アメリカ合衆国")]},
    [_answer("unanswerable", None)],
    [_answer("binary", "yes")],
    [_answer("long_answer", None)],
    {"en": [_answer("number", "1,234")], "de": [_answer("number", "1.234")],
     "ja": [_answer("number", "1,234")]},
    {"en": [_answer("entity", "Café Müller")], "de": [_answer("entity", "Café Müller")],
     "ja": [_answer("entity", "カフェ")]},
    {"en": [_answer("date", "4 July 1776"), _answer("short_phrase", "Independence Day")],
     "de": [_answer("date", "4. Juli 1776")], "ja": [_answer("date", "1776年7月4日")]},
    {"en": [_answer("entity", "Obama")], "de": [_answer("entity", "Obama")],
     "ja": [_answer("entity", "オバマ")]},
]

# Passage snippets that contain (or, for the last ones, only nearly contain) the answers above.
SNIPPETS = ["the U.S. army", "Vereinigte Staaten von Amerika", "アメリカ合衆国 の 首都",
            "about 1,234 people", "etwa 1.234 Menschen", "at the CAFE\u0301 MU\u0308LLER bar",
            "cafe muller", "on 4 July 1776", "am 4. Juli 1776", "カフェ で", "Obamacare costs",
            "Barack Obama said", "the US army", "Independence Day parade", "オバマ 大統領"]


def write_mkqa(path: str, examples=EXAMPLES) -> str:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as f:
    for i, answers in enumerate(examples):
      per_lang = answers if isinstance(answers, dict) else {lang: answers for lang in LANGS}
      f.write(json.dumps({
          "example_id": 1000 + i, "query": f"english question {i}",
          "queries": {lang: f"{lang} question {i}" for lang in LANGS},
          "answers": per_lang}, ensure_ascii=False) + "\n")
  return path


def write_corpus(directory: str, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  filler = ["river", "stone", "light", "market", "village", "Fluss", "Stein", "山", "川"]
  os.makedirs(directory, exist_ok=True)
  texts = []
  with open(os.path.join(directory, "corpus.jsonl"), "w", encoding="utf-8") as f:
    for i in range(NUM_DOCS):
      words = list(rng.choice(filler, size=6))
      if i % 3 == 0:
        words.insert(int(rng.integers(0, 6)), SNIPPETS[int(rng.integers(len(SNIPPETS)))])
      text = " ".join(words)
      texts.append(text)
      # The title holds an answer that must NOT count: DPR matches the passage text only.
      f.write(json.dumps({"_id": f"p{i}", "title": "Obama" if i == 1 else "",
                          "text": text}, ensure_ascii=False) + "\n")
  return texts


# --- an independent reference: DPR's has_answer from its description ---------------------------
def _reference_tokens(text):
  """Runs of letters, digits and marks, or single other non-space, non-control characters."""
  tokens, current = [], ""
  for ch in unicodedata.normalize("NFD", text):
    category = unicodedata.category(ch)
    if category[0] in "LNM":
      current += ch
      continue
    if current:
      tokens.append(current)
      current = ""
    if category[0] not in "ZC":
      tokens.append(ch)
  if current:
    tokens.append(current)
  return [t.lower() for t in tokens]


def _reference_has_answer(text, answers):
  words = _reference_tokens(text)
  for answer in answers:
    a = _reference_tokens(answer)
    if a and any(words[i:i + len(a)] == a for i in range(len(words) - len(a) + 1)):
      return True
  return False


def _reference_recall(examples, texts, query_emb, doc_emb, answer_language):
  """{lang: (recall@20, recall@100, kept queries)} by brute force over the kept queries."""
  out = {}
  for lang in LANGS:
    hits20, hits100 = [], []
    for i, answers in enumerate(examples):
      per_lang = answers if isinstance(answers, dict) else {x: answers for x in LANGS}
      chosen = per_lang["en" if answer_language == "en" else lang]
      if any(a["type"] in ("unanswerable", "binary", "long_answer") for a in chosen):
        continue
      strings = [s for a in chosen for s in [a["text"]] + a["aliases"] if s]
      scores = doc_emb.astype(np.float64) @ query_emb[(i, lang)].astype(np.float64)
      order = np.argsort(-scores, kind="stable")
      found = [_reference_has_answer(texts[d], strings) for d in order[:100]]
      hits20.append(any(found[:20]))
      hits100.append(any(found))
    out[lang] = (np.mean(hits20), np.mean(hits100), len(hits20))
  return out


def test_dpr_normalisation_and_matching():
  tokens = mkqa.answer_tokens("at the CAFE\u0301 MU\u0308LLER bar")
  assert tokens == mkqa.answer_tokens("at the café müller bar")  # NFD + lower-case
  assert mkqa.contains_answer(tokens, [mkqa.answer_tokens("Café Müller")])
  assert not mkqa.contains_answer(mkqa.answer_tokens("cafe muller"),
                                  [mkqa.answer_tokens("Café Müller")])  # accents are kept
  assert mkqa.answer_tokens("U.S.") == ("u", ".", "s", ".")  # punctuation split
  assert mkqa.contains_answer(mkqa.answer_tokens("the U.S. army"), [mkqa.answer_tokens("U.S.")])
  assert not mkqa.contains_answer(mkqa.answer_tokens("the US army"),
                                  [mkqa.answer_tokens("U.S.")])
  assert not mkqa.contains_answer(mkqa.answer_tokens("Obamacare costs"),
                                  [mkqa.answer_tokens("Obama")])  # whole tokens only
  for text in SNIPPETS + ["a—b (c) 1,234.5 x", "\tmixed 日本語 text"]:
    assert list(mkqa.answer_tokens(text)) == _reference_tokens(text)


def test_reader_applies_the_bge_m3_filter(tmp_path):
  for name in ("mkqa.jsonl", "mkqa.jsonl.gz"):
    read = mkqa.read_mkqa(write_mkqa(str(tmp_path / name)), ["de", "en"])
    assert read.num_examples == len(EXAMPLES) and read.languages == ["de", "en"]
    assert read.dropped == {"de": 3, "en": 3}  # unanswerable, binary, long answer
    assert [q.uid for q in read.queries][:4] == ["1000_de", "1000_en", "1004_de", "1004_en"]
    first = read.queries[0]
    assert first.text == "de question 0"
    assert first.answers == (("united", "states"), ("u", ".", "s", "."), ("usa",))  # English
  own = mkqa.read_mkqa(str(tmp_path / "mkqa.jsonl"), ["de"], answer_language="query")
  assert own.queries[0].answers == (("vereinigte", "staaten"), ("usa",))
  assert mkqa.read_mkqa(str(tmp_path / "mkqa.jsonl")).languages == list(LANGS)  # default: all


@pytest.mark.parametrize("answer_language", ["en", "query"])
def test_answer_recall_equals_an_independent_reference(tmp_path, answer_language):
  mkqa_file = write_mkqa(str(tmp_path / "mkqa.jsonl.gz"))
  texts = write_corpus(str(tmp_path / "corpus"))
  rng = np.random.default_rng(1)
  query_emb = {(i, lang): rng.standard_normal(DIM).astype(np.float32)
               for i in range(len(EXAMPLES)) for lang in LANGS}
  doc_emb = rng.standard_normal((NUM_DOCS, DIM)).astype(np.float32)
  emb_dir = str(tmp_path / "emb")
  embeddings_io.save(emb_dir, "queries", [f"{1000 + i}_{lang}" for i, lang in query_emb],
                     np.stack(list(query_emb.values())))
  # Rows in corpus.jsonl order, or (second case) permuted: hits must follow the ids, not rows.
  rows = np.arange(NUM_DOCS) if answer_language == "en" else rng.permutation(NUM_DOCS)
  embeddings_io.save(emb_dir, "candidates", [f"p{i}" for i in rows], doc_emb[rows])
  out = tmp_path / "out"
  results = runner.run(runner.RunOptions(
      embeddings=emb_dir, dataset="mkqa", mkqa_file=mkqa_file,
      corpus_dir=str(tmp_path / "corpus"), answer_language=answer_language,
      output_dir=str(out), normalize=False, show_progress=False))
  want = _reference_recall(EXAMPLES, texts, query_emb, doc_emb, answer_language)
  by_lang = {e["query_lang"]: e for e in results["multilingual_by_lang"]}
  for lang in LANGS:
    r20, r100, kept = want[lang]
    assert 0 < r20 < r100 <= 1 or lang == "ja"  # the fixture has misses and hits
    assert by_lang[lang]["recall@20"] == pytest.approx(r20, abs=1e-9)
    assert by_lang[lang]["recall@100"] == pytest.approx(r100, abs=1e-9)
    assert by_lang[lang]["num_queries"] == kept
  summary = results["summary"]["multilingual"]
  assert summary["recall@100"] == pytest.approx(np.mean([want[x][1] for x in LANGS]), abs=1e-9)
  assert results["mkqa"]["answer_language"] == answer_language
  assert results["mkqa"]["dropped_per_language"] == {"de": 3, "en": 3, "ja": 3}
  per_query = report.read_per_query(str(out))
  assert list(per_query["setting_columns"]) == list(LANGS) + ["all"]
  assert set(np.unique(per_query["metrics"]["recall@100"][:, -1])) <= {0.0, 1.0}
  for name in ("results.json", "results.md", "per_query.npz", "answer_recall.png", "run.trec"):
    assert (out / name).is_file()
  assert "| **average** |" in (out / "results.md").read_text()
  meta = json.loads((out / "results_meta.json").read_text())
  assert meta["answer_language"] == answer_language


def test_malformed_mkqa_lines_name_file_line_and_field(tmp_path):
  path = str(tmp_path / "mkqa.jsonl")
  write_mkqa(path, EXAMPLES[:2])
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps({"example_id": 1, "query": "q", "queries": {"en": "q"}}) + "\n")
  with pytest.raises(mkqa.MkqaFormatError, match=r"mkqa\.jsonl:3: missing field\(s\) "
                                                 r"\['answers'\]"):
    mkqa.read_mkqa(path)
  write_mkqa(path, [{"en": [{"text": "x"}], "de": [], "ja": []}])
  with pytest.raises(mkqa.MkqaFormatError, match=r"mkqa\.jsonl:1: field answers\.en\[0\] lacks "
                                                 r"'type'"):
    mkqa.read_mkqa(path, ["en"])
  write_mkqa(path, EXAMPLES[:1])
  with pytest.raises(mkqa.MkqaFormatError, match=r"mkqa\.jsonl:1: field queries\.ko is missing"):
    mkqa.read_mkqa(path, ["ko"])
  with pytest.raises(runner.EvaluateUsageError, match=r"--dataset=mkqa needs --mkqa_file"):
    runner.run(runner.RunOptions(embeddings=str(tmp_path), dataset="mkqa", show_progress=False))
