r"""absl entry point of hard-negative mining: flags -> data/mining.run. Thin.

    python -m hybrid_jax.mine --model=$(python -c "from hybrid_jax.models import e5_convert; \
        print(e5_convert.default_dir())") --query_prefix="query: " --passage_prefix="passage: " \
        --data=mlqa-r --heldout_fraction=0.2 --out=/tmp/mlqa_r_mined.jsonl \
        --negative_language=query:0.5,positive:0.5 --skip_top=2 --margin=0.02
    python -m hybrid_jax.train --config=configs/me5_hybrid.py --workdir=/tmp/run \
        --config.data.source=jsonl --config.data.path=/tmp/mlqa_r_mined.jsonl \
        --config.data.hard_negatives=True

Writes the project's training JSONL (hybrid_jax/data/records.py) with a mined negative for every
(id, positive language, query language) slot, and FILE.summary.json with the run's counts.
"""

from __future__ import annotations

from absl import app
from absl import flags

from hybrid_jax import errors
from hybrid_jax import native_log
from hybrid_jax.data import mining

_DATA = flags.DEFINE_string("data", None, "LAReQA directory (one <lang>.json per language; a name "
                            "like mlqa-r is looked up under $HYBRID_JAX_DATA) or a "
                            "parallel-examples JSONL file.")
_OUT = flags.DEFINE_string("out", None, "The mined training JSONL to write.")
_MODEL = flags.DEFINE_string("model", "", "Hugging Face model directory to retrieve with.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Training run to retrieve with (its checkpoint).")
_STEP = flags.DEFINE_string("step", "best", "--workdir checkpoint: best | last | a step number.")
_LANGUAGES = flags.DEFINE_list("languages", [], "Languages to mine (default: all of --data).")
_CONTEXT = flags.DEFINE_bool("passage_with_context", False,
                             "LAReQA: passages are the sentence + its paragraph (as in training "
                             "with data.passage_with_context).")
_HELDOUT_FRACTION = flags.DEFINE_float(
    "heldout_fraction", -1.0, "LAReQA: mine the train part of this held-out split (-1: the "
    "--workdir run's data.heldout_fraction when it trained on --data; required otherwise, 0 = "
    "every question).")
_HELDOUT_UNIT = flags.DEFINE_enum("heldout_unit", "", ["", "article", "paragraph"],
                                  "Held-out grouping ('': the run's, else article).")
_HELDOUT_SEED = flags.DEFINE_integer("heldout_seed", -1, "Held-out seed (-1: the run's, else 0).")
_POOL = flags.DEFINE_string("pool", "", "Extra candidate passages: JSONL of "
                            '{"id": ..., "lang": ..., "text": ...}.')
_NEGATIVE_LANGUAGE = flags.DEFINE_string(
    "negative_language", "query", "Language of each negative: query | positive | any, or a mix "
    "with exact shares of the slots, e.g. query:0.5,positive:0.5.")
_SKIP_TOP = flags.DEFINE_integer("skip_top", 0, "Never take ranks 1..N of the slot's "
                                 "language-filtered candidate list.")
_MARGIN = flags.DEFINE_float("margin", None, "Drop candidates scoring above the positive's score "
                             "minus this margin (unset: no margin).")
_DEPTH = flags.DEFINE_integer("depth", 64, "Candidates retrieved per query (deepened where too "
                              "few are eligible).")
_SAMPLE_TOP = flags.DEFINE_integer("sample_top", 1, "Pick uniformly among the first N eligible "
                                   "candidates (1: the hardest).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the policy assignment and of --sample_top.")
_QUERY_PREFIX = flags.DEFINE_string("query_prefix", None, "Prepended to queries (default: the "
                                    "--workdir run's; multilingual-e5 expects 'query: ').")
_PASSAGE_PREFIX = flags.DEFINE_string("passage_prefix", None, "Prepended to passages (default: "
                                      "the --workdir run's; multilingual-e5: 'passage: ').")
_QUERY_LEN = flags.DEFINE_integer("query_max_length", 64, "Query tokens, special tokens included.")
_PASSAGE_LEN = flags.DEFINE_integer("passage_max_length", 0,
                                    "Passage tokens (0: 128, or 512 with --passage_with_context).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Texts per encoder batch (over all devices).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Encoder compute dtype.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  native_log.quiet_library_info_logs()  # --workdir restores through Orbax

  def run():
    config = mining.MiningConfig(
        language_shares=mining.parse_language_shares(_NEGATIVE_LANGUAGE.value),
        skip_top=_SKIP_TOP.value, margin=_MARGIN.value, depth=_DEPTH.value,
        sample_top=_SAMPLE_TOP.value, seed=_SEED.value)
    return mining.run(mining.MineOptions(
        data=_DATA.value or "", out=_OUT.value or "", model=_MODEL.value, workdir=_WORKDIR.value,
        step=_STEP.value, languages=tuple(_LANGUAGES.value), passage_with_context=_CONTEXT.value,
        heldout_fraction=_HELDOUT_FRACTION.value, heldout_unit=_HELDOUT_UNIT.value,
        heldout_seed=_HELDOUT_SEED.value, pool=_POOL.value, config=config,
        query_prefix=_QUERY_PREFIX.value, passage_prefix=_PASSAGE_PREFIX.value,
        query_max_length=_QUERY_LEN.value, passage_max_length=_PASSAGE_LEN.value,
        batch_size=_BATCH.value, dtype=_DTYPE.value))

  errors.exit_on_user_error(run)


if __name__ == "__main__":
  app.run(main)
