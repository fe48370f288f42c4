"""Passage ids (data/passage_ids.py): names and identical texts make one passage, relevance spans a
record's languages, a sentence two questions share in one language is masked there only; and
the LAReQA case where a neighbouring-sentence negative is another question's gold sentence, through
TrainingData batches into the loss, with and without train.mask_false_negatives, against NumPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import losses
from hybrid_jax.data import defaults
from hybrid_jax.data import passage_ids
from hybrid_jax.data import pipeline
from hybrid_jax.data import records
from hybrid_jax.data import sources
from hybrid_jax.data import synthetic
from hybrid_jax.models import presets
import train_helpers

T = records.LanguageTexts


def test_names_and_texts_make_one_passage_and_relevance_spans_languages():
  examples = [
      # q1: two translations without names: two passages, both relevant to each row of q1.
      records.ParallelExample("q1", {"en": T("a?", "A.", "B."), "de": T("a?", "A-de.", "X.")}),
      # q2's positive is named "p1"; its negative "A." has q1's English text.
      records.ParallelExample("q2", {"en": T("b?", "B.", "A.", positive_id="p1")}),
      # q3's negative is named "p4": q4's positive, though its text differs.
      records.ParallelExample("q3", {"en": T("c?", "C.", "D'.", negative_id="p4")}),
      records.ParallelExample("q4", {"en": T("d?", "D.", "X.", positive_id="p4")}),
  ]
  corpus = records.ParallelCorpus.from_examples(examples)  # languages (de, en)
  ids = passage_ids.resolve(corpus)
  # Numbered by first appearance, positives row by row first: "A-de." 0, "A." 1, "B." 2, ...
  np.testing.assert_array_equal(ids.positive, [[0, 1], [-1, 2], [-1, 3], [-1, 4]])
  # Negatives: q1 de "X." and q4 en "X." share a text (passage 5); q1's "B." is q2's positive,
  # q2's "A." q1's English one; q3's "D'." is named p4.
  np.testing.assert_array_equal(ids.negative, [[5, 2], [-1, 1], [-1, 4], [-1, 5]])
  assert ids.num_passages == 6
  rows = ids.of_rows(np.array([0, 2, 3]), np.array([0, 1, 1]), np.array([0, 1, 1]))
  np.testing.assert_array_equal(rows["passage_id"], [0, 3, 4])
  np.testing.assert_array_equal(rows["relevant_passage_ids"], [[0, 1], [-1, 3], [-1, 4]])
  np.testing.assert_array_equal(rows["negative_passage_id"], [5, 4, 5])


def test_a_gold_sentence_shared_in_one_language_is_masked_there_only():
  """Two questions share their English gold sentence but not their German ones (XQuAD-R splits
  sentences differently per language): in a batch holding q2's English and German positives, q1
  must drop q2's English positive (its own gold sentence) and keep q2's German one (a true
  negative under LAReQA's relevance, which is per question)."""
  examples = [
      records.ParallelExample("q1", {"en": T("a?", "S.", None, positive_id="en_1"),
                                     "de": T("a-de?", "S1-de.", None, positive_id="de_1")}),
      records.ParallelExample("q2", {"en": T("b?", "S.", None, positive_id="en_1"),
                                     "de": T("b-de?", "S2-de.", None, positive_id="de_2")}),
  ]
  corpus = records.ParallelCorpus.from_examples(examples)  # (de, en)
  ids = passage_ids.resolve(corpus)
  rows = ids.of_rows(np.array([0, 1, 1]), np.array([1, 1, 0]))  # q1 en, q2 en, q2 de
  cfg = losses.LossConfig(mask_false_negatives=True, mask_same_id=False, temperature=0.1)
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  drop = np.asarray(losses.relevant_candidates(batch["relevant_passage_ids"],
                                               batch["passage_id"]))
  np.testing.assert_array_equal(drop, [[True, True, False],   # q1: q2's English is its own
                                       [True, True, True],    # q2: all three are its own
                                       [True, True, True]])
  # Through the loss: q1's row with q2 de as its only negative, against the formula.
  q = np.eye(3, 4, dtype=np.float32)
  p = np.asarray([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0.6, 0.8, 0]], np.float32)
  loss, _ = losses.embedding_loss(
      jnp.asarray(q), jnp.asarray(p), None, None, jnp.zeros(3, jnp.int32), jnp.float32(2.0),
      cfg, passage_id=batch["passage_id"], relevant_passage_ids=batch["relevant_passage_ids"])
  first = np.log(np.exp(2.0) + np.exp(0.0)) - 2.0  # q1: own positive 1.0, q2 de 0.0
  second = 0.0  # q2 en: its other candidates are both its own (dropped)
  third = 0.0
  assert float(loss) == pytest.approx((first + second + third) / 3, rel=1e-5)


def test_negatives_by_query_language_have_their_own_slots():
  negative = records.Negative
  examples = [records.ParallelExample("q1", {
      "en": T("a?", "A.", "N-en.", negatives_by_query_language={"de": negative("B.", "q2")}),
      "de": T("a-de?", "A-de.", "N-de.")}),
              records.ParallelExample("q2", {"en": T("b?", "B.", "M.")})]
  corpus = records.ParallelCorpus.from_examples(examples)  # (de, en): column k * 2 + x
  texts, names = corpus.negative_table()
  assert texts.shape == (2, 4)
  assert list(texts[0]) == ["N-de.", "N-de.", "B.", "N-en."]  # (de,de) (de<-en) (en<-de) (en,en)
  assert list(texts[1]) == [None, None, None, "M."]  # q2 has only en
  assert names[0, 2] == "q2"
  np.testing.assert_array_equal(corpus.negative_column(np.array([0, 1, 0]), np.array([1, 1, 0])),
                                [2, 3, 0])
  ids = passage_ids.resolve(corpus)
  assert ids.negative[0, 2] == ids.positive[1, 1]  # the by-query negative is q2's positive
  assert ids.negative[0, 3] != ids.positive[1, 1]
  # The JSONL round trip keeps the slots and their ids.
  assert records.parse_record(examples[0].to_json(), "x") == examples[0]


# --- the LAReQA case of tests/data/test_sources.py, through batches into the loss --------------
def _reference_loss(q, pos_texts, neg_texts, vectors, scale, mask):
  """InfoNCE from its definition, one row at a time; a candidate is a false negative of row i
  when its text is row i's positive (identical texts embed identically: the same passage)."""
  rows = []
  for i in range(len(q)):
    label = scale * q[i] @ vectors[pos_texts[i]]
    others = [(t, j != i) for j, t in enumerate(pos_texts)] + [(t, True) for t in neg_texts]
    logits = [label] + [scale * q[i] @ vectors[t] for t, is_candidate in others
                        if is_candidate and not (mask and t == pos_texts[i])]
    rows.append(np.log(np.exp(logits).sum()) - label)
  return float(np.mean(rows))


def test_lareqa_false_negatives_are_masked_in_the_loss(tmp_path):
  train_helpers.write_lareqa_neighbour_case(str(tmp_path))
  config = defaults.data_config("mono", prefixes=presets.PAPER_PREFIXES)
  config.update(source="lareqa", path=str(tmp_path), validation_fraction=0.0,
                hard_negatives=True)
  # Words are [UNK] under the synthetic tokenizer; the test supplies its own embeddings.
  tokenizer = synthetic.build_tokenizer(synthetic.SyntheticSpec())
  data = pipeline.TrainingData(config, sources.load_corpus(config), tokenizer)
  plan = data.plan(0, 3)
  batch = data.host_batch(plan)
  corpus = data.corpus
  pos_texts = [corpus.positives[n, k] for n, k in zip(plan.example, plan.passage_lang)]
  columns = corpus.negative_column(plan.query_lang, plan.passage_lang)
  neg_texts = [corpus.negative_table()[0][n, c] for n, c in zip(plan.example, columns)]
  # Row of q1 / q2: the other's negative (and q3's, for q2) is its own positive.
  row = {corpus.ids[n]: i for i, n in enumerate(plan.example)}
  false_negative = np.asarray(losses.relevant_candidates(
      jnp.asarray(batch["relevant_passage_ids"]), jnp.asarray(batch["negative_passage_id"])))
  assert false_negative.sum() == 3
  assert sorted(np.flatnonzero(false_negative.any(axis=1))) == sorted([row["q1"], row["q2"]])
  shared = np.asarray(losses.relevant_candidates(jnp.asarray(batch["relevant_passage_ids"]),
                                                 jnp.asarray(batch["passage_id"])))
  assert not shared[~np.eye(3, dtype=bool)].any()

  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  vectors = {t: unit(rng.normal(size=8)) for t in sorted(set(pos_texts + neg_texts))}
  q = unit(rng.normal(size=(3, 8)) + 2 * np.stack([vectors[t] for t in pos_texts]))
  results = {}
  for mask in (False, True):
    cfg = losses.LossConfig(hard_negatives=True, mask_false_negatives=mask, temperature=0.1)
    cfg.check_batch(batch)
    loss, _ = losses.loss_on_embeddings(
        {"query": jnp.asarray(q, jnp.float32),
         "passage": jnp.asarray(np.stack([vectors[t] for t in pos_texts]), jnp.float32),
         "negative": jnp.asarray(np.stack([vectors[t] for t in neg_texts]), jnp.float32)},
        {}, {k: jnp.asarray(v) for k, v in batch.items()}, cfg)
    results[mask] = float(loss)
    assert results[mask] == pytest.approx(
        _reference_loss(q, pos_texts, neg_texts, vectors, 10.0, mask), rel=1e-5, abs=1e-6)
  # Unmasked, rows q1 and q2 push their own positive away: a clearly larger loss.
  assert results[False] - results[True] > 0.1, results
