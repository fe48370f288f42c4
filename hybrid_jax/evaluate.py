r"""Evaluates a retriever on the LAReQA grid (XQuAD-R, MLQA-R), a BEIR-format set or MKQA.

    python -m hybrid_jax.evaluate --model=HF_DIR --dataset=xquad-r
    python -m hybrid_jax.evaluate --config=configs/xlmr_hybrid.py --workdir=DIR [--step=best]
    python -m hybrid_jax.evaluate --embeddings=DIR --dataset=mlqa-r --languages=en,de,zh
    python -m hybrid_jax.evaluate --workdir=DIR --dataset=mlqa-r --part=test   # held-out articles
    python -m hybrid_jax.evaluate --model=HF_DIR --dataset=beir --data_dir=miracl/sw
    python -m hybrid_jax.evaluate --model=HF_DIR --dataset=mkqa --mkqa_file=mkqa.jsonl.gz \
        --corpus_dir=wiki_en --languages=de,ja,zh_cn

Writes results.json, results.md, settings.csv, per_query.npz, grid_map.png and
rank_distance.png to --output_dir (see hybrid_jax/eval/report.py); beir and mkqa search the whole
corpus (hybrid_jax/search/corpus_eval.py) and also write run.trec. All logic lives in
hybrid_jax.eval.runner; this file only parses flags.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from hybrid_jax import config_lib
from hybrid_jax import errors
from hybrid_jax import native_log
from hybrid_jax.eval import runner

_CONFIG = config_lib.DEFINE_config_file(
    "config", None, "Experiment config (optional): query/passage prefixes from config.data; "
    "with --workdir, the model section.", lock_config=True)
_MODEL = flags.DEFINE_string("model", "", "Hugging Face model directory to evaluate.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Training run directory to evaluate.")
_STEP = flags.DEFINE_string("step", "best", "With --workdir: best | last | a step number.")
_EMBEDDINGS = flags.DEFINE_string(
    "embeddings", "", "Directory of precomputed embeddings: queries.npy + queries.uids.txt, "
    "candidates.npy + candidates.uids.txt.")
_EXPORT = flags.DEFINE_string("export_embeddings", "",
                              "Also write the computed embeddings to this directory.")
_DATASET = flags.DEFINE_enum("dataset", "xquad-r", list(runner.DATASETS), "Evaluation set.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "LAReQA directory (<lang>.json per language; default "
    "$HYBRID_JAX_DATA/<dataset>) or, for beir, the BEIR directory.")
_LANGUAGES = flags.DEFINE_list("languages", [], "Languages to evaluate (default: all in data_dir).")
_CONTEXT = flags.DEFINE_bool("candidate_context", False,
                             "LAReQA candidates as sentence + paragraph instead of the sentence.")
_PART = flags.DEFINE_enum(
    "part", "all", ["all", "test", "train"], "LAReQA: the whole directory, or one part of a "
    "held-out split by article (data/lareqa.py HeldoutSplit): 'test' = the held-out articles a run "
    "never saw. The split comes from --heldout_* or, with --workdir, from the run's config.data "
    "when the run trained on this dataset.")
_HELDOUT_FRACTION = flags.DEFINE_float(
    "heldout_fraction", -1.0, "Share of ids in the test part (-1: the run's data.heldout_fraction).")
_HELDOUT_UNIT = flags.DEFINE_enum("heldout_unit", "", ["", "article", "paragraph"],
                                  "Held-out grouping ('': the run's, else article).")
_HELDOUT_SEED = flags.DEFINE_integer("heldout_seed", -1, "Held-out seed (-1: the run's, else 0).")
_SPLIT = flags.DEFINE_string("beir_split", "test", "BEIR qrels split: qrels/<split>.tsv.")
_MKQA_FILE = flags.DEFINE_string("mkqa_file", "", "mkqa: the official mkqa.jsonl or .jsonl.gz.")
_CORPUS_DIR = flags.DEFINE_string("corpus_dir", "",
                                  "mkqa: BEIR-format corpus directory (corpus.jsonl) to search.")
_ANSWER_LANG = flags.DEFINE_enum(
    "answer_language", "en", ["en", "query"], "mkqa: match the English answers (an English "
    "corpus, BGE-M3's setting) or the answers in the query's language.")
_CORPUS_STORE = flags.DEFINE_string(
    "corpus_store", "", "beir / mkqa: directory of the corpus embedding shards (default "
    "<output_dir>/embeddings/corpus); reused when model and corpus match, resumed when an "
    "earlier run was interrupted.")
_SHARD_SIZE = flags.DEFINE_integer("store_shard_size", 100_000,
                                   "beir / mkqa: passages per embedding shard (unit of resume).")
_STORE_DTYPE = flags.DEFINE_enum("store_dtype", "float32", ["float32", "float16"],
                                 "beir / mkqa: dtype of the stored corpus embeddings.")
_TREC_DEPTH = flags.DEFINE_integer("trec_depth", 0, "beir / mkqa: documents per query in "
                                   "run.trec (0: 1000 for beir, 100 for mkqa).")
_SEARCH_DTYPE = flags.DEFINE_enum("search_dtype", "float32", ["float32", "bfloat16"],
                                  "beir / mkqa: embeddings dtype in the exact search (scores "
                                  "accumulate in float32).")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "", "Where results go (default: <workdir>/eval/<dataset>-step<step>, else "
    "eval_results/<source>/<dataset>). Embeddings are cached in <output_dir>/embeddings.")
_QUERY_PREFIX = flags.DEFINE_string(
    "query_prefix", None, "Prepended to queries (default: config.data.query_prefix, else "
    "'Query: '; multilingual-e5 models expect 'query: ').")
_PASSAGE_PREFIX = flags.DEFINE_string(
    "passage_prefix", None, "Prepended to candidates (default: config.data.passage_prefix, "
    "else 'Passage: '; multilingual-e5 expects 'passage: ').")
_QUERY_LEN = flags.DEFINE_integer("query_max_length", 64, "Query tokens, special tokens included.")
_PASSAGE_LEN = flags.DEFINE_integer("passage_max_length", 0,
                                    "Candidate tokens (0: 128, or 512 with --candidate_context).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Texts per encoder batch (over all devices).")
_POOLING = flags.DEFINE_enum("pooling", "", ["", "cls", "mean", "pooler"],
                             "Override the model's pooling.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Encoder compute dtype.")
_GROUPS = flags.DEFINE_string(
    "groups", "", "Language groups averaged in the summary: NAME=l1+l2;NAME2=..., e.g. "
    "low_resource=el+hi+th+tr+vi. With --workdir an 'unseen' group (the languages the run did not "
    "train on) is added unless given here; a --model has no training languages to derive it from.")
_NORMALIZE = flags.DEFINE_bool("normalize", True,
                               "L2-normalise embeddings before scoring (cosine similarity).")
_CENTER = flags.DEFINE_bool(
    "center_languages", False, "Training-free language-bias baseline: subtract each language's "
    "mean query embedding from its queries and mean candidate embedding from its candidates "
    "(means of the evaluated collection itself, no labels), re-normalise, then score. LAReQA "
    "and synthetic only; the default output directory gets a -centered suffix.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  native_log.quiet_library_info_logs()  # --workdir restores through Orbax
  options = runner.RunOptions(
      dataset=_DATASET.value, data_dir=_DATA_DIR.value, languages=tuple(_LANGUAGES.value),
      candidate_context=_CONTEXT.value, part=_PART.value,
      heldout_fraction=_HELDOUT_FRACTION.value, heldout_unit=_HELDOUT_UNIT.value,
      heldout_seed=_HELDOUT_SEED.value, beir_split=_SPLIT.value, mkqa_file=_MKQA_FILE.value,
      corpus_dir=_CORPUS_DIR.value, answer_language=_ANSWER_LANG.value,
      corpus_store=_CORPUS_STORE.value, store_shard_size=_SHARD_SIZE.value,
      store_dtype=_STORE_DTYPE.value, trec_depth=_TREC_DEPTH.value,
      search_dtype=_SEARCH_DTYPE.value, model=_MODEL.value,
      workdir=_WORKDIR.value, step=_STEP.value, config=_CONFIG.value,
      embeddings=_EMBEDDINGS.value, export_embeddings=_EXPORT.value, output_dir=_OUTPUT_DIR.value,
      query_prefix=_QUERY_PREFIX.value, passage_prefix=_PASSAGE_PREFIX.value,
      query_max_length=_QUERY_LEN.value, passage_max_length=_PASSAGE_LEN.value,
      batch_size=_BATCH.value, pooling=_POOLING.value, dtype=_DTYPE.value,
      groups=runner.parse_groups(_GROUPS.value), normalize=_NORMALIZE.value,
      center_languages=_CENTER.value)
  # User-caused problems (flags, paths, data) are errors.UserError: one "error:" line, status 2.
  # Anything else keeps its traceback: it is a bug to report, not a setting to change.
  errors.exit_on_user_error(lambda: runner.run(options, argv=sys.argv))


if __name__ == "__main__":
  app.run(main)
