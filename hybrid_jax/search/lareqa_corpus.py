r"""XQuAD-R + MLQA-R as one BEIR-format corpus: a real multilingual test of corpus-scale search.

    python -m hybrid_jax.search.convert_lareqa --out=DIR [--xquad_dir=...] [--mlqa_dir=...]

(the command line; this module is its logic, importable without defining flags)

No MKQA or MIRACL data is on this machine, so the corpus-scale evaluator's real-data run uses
this: every candidate sentence of both datasets (~33.5k passages in 11 languages) in one
corpus.jsonl, every question of both in queries.jsonl, and qrels/test.tsv where a question's
relevant passages are its id's gold sentences in every language of its dataset (LAReQA's
relevance, DESIGN.md "Evaluation grid"). Searching the whole corpus, a German XQuAD-R question
competes with every MLQA-R sentence too, which the LAReQA pools never do.

Ids: a dataset prefix keeps the two datasets' ids apart: passages `xquad-r:{lang}_{n}_{k}`,
queries `xquad-r:{id}_{lang}` (LAReQA's uids after the colon). Every row carries
`metadata: {"lang", "dataset"}`, which the BEIR evaluator reads as the language tag
(search/beir_eval.py): each query language is reported against the whole corpus (X->all).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from hybrid_jax.eval import collection as collection_lib

DATASETS = ("xquad-r", "mlqa-r")


def convert(out_dir: str, data_dirs: Mapping[str, str]) -> dict:
  """Writes corpus.jsonl, queries.jsonl and qrels/test.tsv of the given LAReQA directories
  (dataset name -> directory); returns counts."""
  os.makedirs(os.path.join(out_dir, "qrels"), exist_ok=True)
  counts = {"passages": 0, "queries": 0, "qrels": 0, "languages": set()}
  paths = {name: os.path.join(out_dir, name) for name in ("corpus.jsonl", "queries.jsonl")}
  qrels_path = os.path.join(out_dir, "qrels", "test.tsv")
  with open(paths["corpus.jsonl"] + ".tmp", "w", encoding="utf-8") as corpus, \
      open(paths["queries.jsonl"] + ".tmp", "w", encoding="utf-8") as queries, \
      open(qrels_path + ".tmp", "w", encoding="utf-8") as qrels:
    qrels.write("query-id\tcorpus-id\tscore\n")
    for dataset, data_dir in data_dirs.items():
      col = collection_lib.from_lareqa(data_dir, name=dataset)
      doc_ids = [f"{dataset}:{uid}" for uid in col.candidate_uids]
      for doc_id, text, lang in zip(doc_ids, col.candidate_texts, col.candidate_langs):
        corpus.write(json.dumps({"_id": doc_id, "title": "", "text": text,
                                 "metadata": {"lang": lang, "dataset": dataset}},
                                ensure_ascii=False) + "\n")
      for uid, text, lang, relevant in zip(col.query_uids, col.query_texts, col.query_langs,
                                           col.relevant):
        query_id = f"{dataset}:{uid}"
        queries.write(json.dumps({"_id": query_id, "text": text,
                                  "metadata": {"lang": lang, "dataset": dataset}},
                                 ensure_ascii=False) + "\n")
        qrels.writelines(f"{query_id}\t{doc_ids[c]}\t{int(gain)}\n" for c, gain in relevant)
        counts["qrels"] += len(relevant)
      counts["passages"] += col.num_candidates
      counts["queries"] += col.num_queries
      counts["languages"].update(col.languages)
  for path in list(paths.values()) + [qrels_path]:
    os.replace(path + ".tmp", path)
  counts["languages"] = sorted(counts["languages"])
  return counts
