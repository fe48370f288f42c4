"""Hard-negative mining (data/mining.py) on a LAReQA-format synthetic directory whose paragraphs
also hold sentences no question asks about (train_helpers.write_lareqa_with_unasked_sentences),
with an exact bag-of-words embedder:
constraints against an independent NumPy ranking, exact language shares, determinism, errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from hybrid_jax.data import lareqa
from hybrid_jax.data import mining
from hybrid_jax.data import records
from hybrid_jax.data import synthetic
import train_helpers

SPEC = synthetic.SyntheticSpec(num_entities=12, num_relations=6, seed=3)
DIM = 12


def embed(texts, prefix):
  """Bag of words: each word a fixed vector of multiples of 1/8 in [-1/4, 1/4]. Every dot
  product is a multiple of 1/64, exact in float32, so JAX and NumPy rank identically."""
  out = np.zeros((len(texts), DIM), np.float32)
  for i, text in enumerate(texts):
    for word in (prefix + text).split():
      seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
      out[i] += np.random.default_rng(seed).integers(-2, 3, DIM) / 8
  return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  directory = train_helpers.write_lareqa_with_unasked_sentences(
      str(tmp_path_factory.mktemp("lareqa")), SPEC)
  examples, pool = mining.lareqa_inputs(directory)
  return directory, records.ParallelCorpus.from_examples(examples), pool


def _mine(inputs, **config):
  _, corpus, pool = inputs
  return mining.mine(corpus, pool, embed, embed, mining.MiningConfig(**config), log=lambda m: None)


def _gold(directory):
  """(uids, texts) of every question's gold sentence, read straight from the files."""
  uids, texts = set(), set()
  for data in lareqa.read_languages(directory).values():
    sentence = {c.uid: c.sentence for c in data.candidates}
    for question in data.questions:
      uids.add(question.gold_uid)
      texts.add(sentence[question.gold_uid])
  return uids, texts


def test_exact_counts_is_largest_remainder():
  np.testing.assert_array_equal(mining.exact_counts([0.5, 0.3, 0.2], 7), [4, 2, 1])
  np.testing.assert_array_equal(mining.exact_counts([1 / 3] * 3, 10), [4, 3, 3])
  np.testing.assert_array_equal(mining.exact_counts([1.0], 5), [5])
  np.testing.assert_array_equal(mining.exact_counts([0.25, 0.75], 0), [0, 0])


def test_no_negative_shares_the_query_id_or_is_any_gold_passage(inputs):
  directory, corpus, pool = inputs
  result = _mine(inputs, language_shares=(("query", 0.4), ("positive", 0.3), ("any", 0.3)))
  gold_uids, gold_texts = _gold(directory)
  assert len(pool) - len(gold_uids) >= 80  # the pool has non-gold sentences to mine
  assert result.gold_passage.sum() == len(gold_uids)
  chosen = result.negative[result.negative >= 0]
  assert len(chosen) == len(result.slots) > 500  # every slot found a negative
  for p in chosen:
    assert pool.uids[p] not in gold_uids and pool.texts[p] not in gold_texts
  # No negative is a passage of the slot's own question id, in any of its languages.
  for i in np.flatnonzero(result.negative >= 0):
    assert pool.texts[result.negative[i]] not in set(corpus.positives[result.slots.row[i]])
  # The written file holds the same: no negative text is any training positive.
  examples = [e for e, _ in result.examples()]
  positives = {t.positive for e in examples for t in e.languages.values()}
  negatives = [text for e in examples for t in e.languages.values()
               for text in [t.negative] + [n.text for n in t.negatives_by_query_language.values()]]
  assert len(negatives) == len(result.slots) and not set(negatives) & positives


@pytest.mark.parametrize("shares", [(("query", 1.0),), (("positive", 1.0),),
                                    (("query", 0.5), ("positive", 0.3), ("any", 0.2))],
                         ids=["query", "positive", "mix"])
def test_language_shares_are_met_exactly(inputs, shares):
  _, corpus, pool = inputs
  result = _mine(inputs, language_shares=shares, seed=5)
  slots = result.slots
  total = len(slots)
  # Independent count: floors, then the leftover slots to the largest fractional parts.
  raw = np.asarray([share for _, share in shares]) * total
  expected = np.floor(raw).astype(int)
  for i in np.argsort(-(raw - expected), kind="stable")[:total - expected.sum()]:
    expected[i] += 1
  counts = [int(np.sum(slots.policy == mining.POLICIES.index(name))) for name, _ in shares]
  assert counts == list(expected) and sum(counts) == total
  for i in range(total):
    language = pool.languages[result.negative[i]]
    policy = mining.POLICIES[slots.policy[i]]
    if policy == "query":
      assert language == corpus.languages[slots.query_lang[i]]
    elif policy == "positive":
      assert language == corpus.languages[slots.passage_lang[i]]
  # Every (id, Y, X) pair of languages the id has is one slot.
  assert total == int(sum(c ** 2 for c in corpus.presence.sum(axis=1)))


@pytest.mark.parametrize("skip_top,margin", [(0, None), (2, None), (0, 0.25), (3, 0.5)])
def test_skip_top_and_margin_choose_the_first_eligible_candidate(inputs, skip_top, margin):
  """Against a NumPy ranking written here: per slot, the allowed pool passages in the slot's
  negative language, stably sorted by (-score, index); eligible = rank > skip_top, score <= the
  score of the question's positive in that language - margin, not the slot's question; the
  choice is the first eligible one."""
  directory, corpus, pool = inputs
  result = _mine(inputs, language_shares=(("query", 0.4), ("positive", 0.3), ("any", 0.3)),
                 skip_top=skip_top, margin=margin, depth=4)
  gold_uids, gold_texts = _gold(directory)
  allowed = np.asarray([u not in gold_uids and t not in gold_texts
                        for u, t in zip(pool.uids, pool.texts)])
  pool_emb = embed(pool.texts, "")
  pool_languages = np.asarray(pool.languages)
  s = result.slots
  for i in range(len(s)):
    n, x, y = s.row[i], s.query_lang[i], s.passage_lang[i]
    query = embed([corpus.queries[n, x]], "")[0]
    # The margin's positive: the question's own in the candidate's language, else the Y one.
    positive_scores = {corpus.languages[k]: float(query @ embed([corpus.positives[n, k]], "")[0])
                       for k in np.flatnonzero(corpus.presence[n])}
    policy = mining.POLICIES[s.policy[i]]
    in_language = (np.ones(len(pool), bool) if policy == "any" else
                   pool_languages == corpus.languages[x if policy == "query" else y])
    candidates = np.flatnonzero(allowed & in_language)
    scores = pool_emb[candidates] @ query
    order = candidates[np.lexsort((candidates, -scores))]
    reference = [positive_scores.get(pool.languages[p], positive_scores[corpus.languages[y]])
                 for p in order]
    eligible = [p for rank, (p, ref) in enumerate(zip(order, reference), start=1)
                if rank > skip_top and (margin is None or
                                        float(pool_emb[p] @ query) <= ref - margin)]
    expected = eligible[0] if eligible else -1
    assert result.negative[i] == expected, (i, skip_top, margin)
    if expected >= 0:
      assert result.rank[i] == list(order).index(expected) + 1 > skip_top
      assert result.score[i] == pytest.approx(float(pool_emb[expected] @ query), abs=0)
      assert result.positive_score[i] == pytest.approx(
          reference[list(order).index(expected)], abs=0)
      if margin is not None:
        assert result.score[i] <= result.positive_score[i] - margin
  found = result.negative >= 0
  assert found.mean() > (0.99 if margin is None else 0.5)  # misses: nothing eligible at all
  if margin is None and skip_top == 0:
    assert np.all(result.rank[found] == 1)


def test_deterministic_given_the_seed(inputs, tmp_path):
  runs = {}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    result = _mine(inputs, language_shares=(("query", 0.5), ("any", 0.5)), sample_top=3,
                   seed=seed)
    path = str(tmp_path / f"{name}.jsonl")
    mining.write(path, result)
    runs[name] = (result, open(path, "rb").read())
  assert runs["a"][1] == runs["b"][1]
  assert runs["a"][1] != runs["c"][1]
  a, c = runs["a"][0], runs["c"][0]
  assert not np.array_equal(a.slots.policy, c.slots.policy)
  assert np.mean(a.negative != c.negative) > 0.3
  # sample_top=3 picks among the first three eligible ranks, not always the first.
  assert set(np.unique(a.rank[a.negative >= 0])) == {1, 2, 3}


def test_written_file_reads_back_with_provenance_and_trains_the_pipeline(inputs, tmp_path):
  from hybrid_jax.data import defaults  # pylint: disable=g-import-not-at-top
  from hybrid_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import presets  # pylint: disable=g-import-not-at-top
  _, corpus, _ = inputs
  result = _mine(inputs, language_shares=(("query", 0.5), ("positive", 0.5)))
  path = str(tmp_path / "mined.jsonl")
  assert mining.write(path, result) == corpus.num_examples
  lines = [json.loads(line) for line in open(path, encoding="utf-8")]
  first = lines[0]
  lang = next(iter(first["languages"]))
  provenance = first["meta"]["mined"][lang][lang]
  assert set(provenance) == {"policy", "language", "rank", "score", "positive_score", "source"}
  assert first["languages"][lang]["negative_id"] == provenance["source"]
  mined = records.ParallelCorpus.from_examples(records.read_jsonl(path))
  assert mined.ids == corpus.ids and mined.query_negatives is not None
  config = defaults.data_config("hybrid", prefixes=presets.PAPER_PREFIXES)
  config.update(source="jsonl", path=path, hard_negatives=True, tf_threads=1)
  data = pipeline.TrainingData.from_config(config, tokenizer=synthetic.build_tokenizer(SPEC))
  batch = next(data.train_batches(16))
  assert batch["negative_input_ids"].shape == (16, 24)
  # Mined negatives are never positives: no false negative in any batch.
  for step in range(20):
    b = data.host_batch(data.plan(step, 16))
    assert not np.equal.outer(b["passage_id"], b["negative_passage_id"]).any()


def test_bad_options_and_inputs_are_clear_errors(inputs, tmp_path):
  for text, message in (("quer", r"unknown policy 'quer'"),
                        ("query:0.5,positive:0.4", r"shares must sum to 1, found 0.9"),
                        ("query:x", r"share 'x' of 'query' is not a number"),
                        ("query,query", r"names 'query' twice"), ("", "is empty")):
    with pytest.raises(mining.MiningError, match=message):
      mining.parse_language_shares(text)
  assert mining.parse_language_shares("query:0.5, any:0.5") == (("query", 0.5), ("any", 0.5))
  with pytest.raises(mining.MiningError, match=r"--skip_top must be an integer >= 0, found -1"):
    mining.MiningConfig(skip_top=-1).validate()
  with pytest.raises(mining.MiningError, match=r"--depth must be an integer >= 1"):
    mining.MiningConfig(depth=0).validate()
  # A pool of gold passages only has nothing to mine.
  _, corpus, pool = inputs
  gold_only = mining.Pool([corpus.positives[0, 0]], [corpus.languages[0]], [None], ["g"])
  with pytest.raises(mining.MiningError, match="holds only gold passages"):
    mining.mine(corpus, gold_only, embed, embed, mining.MiningConfig(), log=lambda m: None)
  bad_pool = tmp_path / "pool.jsonl"
  bad_pool.write_text('{"id": "p1", "lang": "en"}\n')
  with pytest.raises(mining.MiningError, match=r"pool.jsonl:1: expected exactly the fields id, "
                     r"lang, text; found \['id', 'lang'\]"):
    mining.read_pool_file(str(bad_pool))
  options = mining.MineOptions(data=str(tmp_path / "missing"), out=str(tmp_path / "o.jsonl"),
                               query_prefix="", passage_prefix="")
  with pytest.raises(mining.MiningError, match="exactly one of --model=HF_DIR"):
    mining.run(options)
  options.model = str(tmp_path / "no_model")
  with pytest.raises(mining.MiningError, match=r"--data=.*missing' does not exist; expected a "
                     "LAReQA directory"):
    mining.run(options)
  options.data = inputs[0]
  options.query_prefix = None
  with pytest.raises(mining.MiningError, match="pass --query_prefix and --passage_prefix"):
    mining.run(options)
  options.query_prefix = ""
  with pytest.raises(mining.MiningError, match=r"LAReQA directory and no held-out split is known: "
                     r"pass --heldout_fraction"):
    mining.run(options)
  options.heldout_fraction = 0.0
  with pytest.raises(mining.MiningError, match=r"--model=.*no_model' is not a directory"):
    mining.run(options)
  assert not (tmp_path / "o.jsonl").exists()


def test_cells_without_an_own_negative_are_left_out(inputs, tmp_path):
  """A margin no candidate can meet for some slots: cells whose own (X = Y) slot found nothing
  are dropped, with the negatives other cells hold for queries in their language, and every
  remaining cell has a `negative` (data.hard_negatives=True trains on the file)."""
  _, corpus, _ = inputs
  result = _mine(inputs, margin=0.75)
  missing = result.negative < 0
  own = result.slots.query_lang == result.slots.passage_lang
  assert missing[own].sum() > 10 and missing[~own].sum() > 10
  dropped = {(corpus.ids[n], corpus.languages[y]) for n, y, x, m in zip(
      result.slots.row, result.slots.passage_lang, result.slots.query_lang, missing) if m and x == y}
  assert result.summary()["cells_dropped"] == len(dropped)
  path = str(tmp_path / "mined.jsonl")
  mining.write(path, result)
  written = records.read_jsonl(path)
  cells = {(e.id, lang) for e in written for lang in e.languages}
  assert not cells & dropped
  assert len(cells) == int(corpus.presence.sum()) - len(dropped)
  for example in written:
    for texts in example.languages.values():
      assert texts.negative is not None
      assert set(texts.negatives_by_query_language) <= set(example.languages)
