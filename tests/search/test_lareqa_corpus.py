"""search.lareqa_corpus: XQuAD-R + MLQA-R as one BEIR corpus, read back by the BEIR evaluator."""

from __future__ import annotations

import collections
import os

import pytest

from hybrid_jax.data import lareqa
from hybrid_jax.data import locations
from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.search import beir_eval
from hybrid_jax.search import lareqa_corpus

ROOT = locations.data_root()
pytestmark = pytest.mark.real_data


def test_converted_corpus_holds_both_datasets_with_lareqa_relevance(tmp_path):
  dirs = {name: os.path.join(ROOT, name) for name in lareqa_corpus.DATASETS}
  counts = lareqa_corpus.convert(str(tmp_path), dirs)
  assert counts["passages"] == 33548 and counts["queries"] == 17289  # 13,014 + 20,534 passages
  assert counts["languages"] == ["ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh"]
  evaluator = beir_eval.BeirEvaluator(str(tmp_path), show_progress=False)
  col = evaluator.collection
  assert col.num_candidates == 33548 and col.cross_lingual and len(col.languages) == 11
  # A question's relevant passages: its id's gold sentences in every language of its dataset.
  mlqa = collection_lib.from_lareqa(dirs["mlqa-r"])
  row = mlqa.query_uids.index(mlqa.query_uids[123])
  want = {f"mlqa-r:{mlqa.candidate_uids[c]}" for c, _ in mlqa.relevant[row]}
  got = evaluator.relevant[col.query_uids.index(f"mlqa-r:{mlqa.query_uids[123]}")]
  assert set(got) == want and len(want) >= 2 and all(g == 1.0 for g in got.values())
  per_lang = collections.Counter(col.query_langs)
  assert per_lang["en"] == 1190 + mlqa.query_langs.count("en") and per_lang["el"] == 1190
