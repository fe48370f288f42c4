r"""Converts LAReQA directories and mMARCO-style TSV files to the parallel-examples JSONL format.

    # LAReQA (XQuAD-R / MLQA-R): query -> gold sentence (+ paragraph), neighbour sentence negative
    python -m hybrid_jax.data.convert --from=lareqa --input=~/.cache/hybrid_jax/data/mlqa-r \
        --output=/tmp/mlqa_r.jsonl [--languages=en,de,es] [--with_context]

    # mMARCO-style: per-language queries and collection TSVs sharing ids, one id triples file
    python -m hybrid_jax.data.convert --from=mmarco --languages=english,german \
        --queries='mmarco/queries/train/{lang}_queries.train.tsv' \
        --collection='mmarco/collections/{lang}_collection.tsv' \
        --triples=mmarco/triples.train.ids.small.tsv --output=/tmp/mmarco.jsonl [--max_ids=100000]

mMARCO inputs: `{lang}` in --queries/--collection is replaced by each language code; queries and
collection lines are `id<TAB>text`, triples lines `query_id<TAB>positive_id<TAB>negative_id`. The
first triple of a query id gives its positive and hard negative; an id is written in every language
whose queries file holds it and whose collection holds its positive (a missing negative is left
out). Only the passages named in the triples are kept in memory, so full collections stream.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

from absl import app
from absl import flags

from hybrid_jax import errors
from hybrid_jax.data import lareqa
from hybrid_jax.data import records
from hybrid_jax.data import text_files

_FROM = flags.DEFINE_enum("from", None, ["lareqa", "mmarco"], "Input format.")
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL file.")
_LANGUAGES = flags.DEFINE_list("languages", [], "Language codes (lareqa: default all files).")
_INPUT = flags.DEFINE_string("input", None, "lareqa: directory with one <lang>.json per language.")
_WITH_CONTEXT = flags.DEFINE_bool("with_context", False, "lareqa: passage = sentence + paragraph.")
_QUERIES = flags.DEFINE_string("queries", None, "mmarco: queries TSV path with {lang}.")
_COLLECTION = flags.DEFINE_string("collection", None, "mmarco: collection TSV path with {lang}.")
_TRIPLES = flags.DEFINE_string("triples", None, "mmarco: query/positive/negative id triples TSV.")
_MAX_IDS = flags.DEFINE_integer("max_ids", 0, "mmarco: keep the first N query ids (0 = all).")


def _tsv_lines(path: str, num_fields: int, desc: str):
  """Yields (line_number, fields) of a TSV file; progress on stderr for big files."""
  text_files.check_file(path, f"{desc} file", records.DataError)
  size = max(os.path.getsize(path), 1)
  start, next_report = time.time(), 1 << 28
  for line_number, offset, raw in text_files.iter_raw_lines(path, f"{desc} file",
                                                            records.DataError):
    done = offset + len(raw)
    if done >= next_report:
      elapsed = time.time() - start
      print(f"{desc}: {path}: {100 * done / size:.0f}%, ETA {elapsed / done * (size - done):.0f}s",
            file=sys.stderr, flush=True)
      next_report += 1 << 28
    line = text_files.decode_line(path, line_number, offset, raw,
                                  records.DataError).rstrip("\r\n")
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) != num_fields or not all(x.strip() for x in fields):
      raise records.DataError(
          f"{path}:{line_number}: expected {num_fields} non-empty tab-separated fields, found "
          f"{len(fields)}: {line[:80]!r}")
    yield line_number, fields


def mmarco_examples(languages: Sequence[str], queries_pattern: str, collection_pattern: str,
                    triples_path: str, max_ids: int = 0) -> list[records.ParallelExample]:
  """Parallel examples from mMARCO-style files (see the module docstring)."""
  if not languages:
    raise records.DataError("--languages is required for mMARCO files (the {lang} values)")
  for name, pattern in (("--queries", queries_pattern), ("--collection", collection_pattern)):
    if "{lang}" not in (pattern or ""):
      raise records.DataError(f"{name}={pattern!r} must contain '{{lang}}', e.g. "
                              "'queries/{lang}_queries.train.tsv'")
  triples: dict[str, tuple[str, str]] = {}
  for _, (qid, positive, negative) in _tsv_lines(triples_path, 3, "triples"):
    if qid not in triples:
      if max_ids and len(triples) >= max_ids:
        break
      triples[qid] = (positive, negative)
  needed_passages = {p for pair in triples.values() for p in pair}
  texts: dict[str, dict[str, records.LanguageTexts]] = {qid: {} for qid in triples}
  for lang in languages:
    queries = {qid: text for _, (qid, text) in
               _tsv_lines(queries_pattern.format(lang=lang), 2, f"queries [{lang}]")
               if qid in triples}
    passages = {pid: text for _, (pid, text) in
                _tsv_lines(collection_pattern.format(lang=lang), 2, f"collection [{lang}]")
                if pid in needed_passages}
    for qid, (positive, negative) in triples.items():
      if qid in queries and positive in passages:
        texts[qid][lang] = records.LanguageTexts(queries[qid], passages[positive],
                                                 passages.get(negative))
  return [records.ParallelExample(qid, langs) for qid, langs in texts.items() if langs]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _FROM.value or not _OUTPUT.value:
    raise app.UsageError("--from=lareqa|mmarco and --output=FILE.jsonl are required")
  def read_examples():
    if _FROM.value == "lareqa":
      if not _INPUT.value:
        raise app.UsageError("--from=lareqa needs --input=DIR (one <lang>.json per language)")
      return lareqa.training_examples(_INPUT.value, _LANGUAGES.value or None, _WITH_CONTEXT.value)
    return mmarco_examples(_LANGUAGES.value, _QUERIES.value, _COLLECTION.value, _TRIPLES.value,
                           _MAX_IDS.value)

  # Data and LAReQA-format errors: one `error:` line, status 2, before the output is created.
  examples = errors.exit_on_user_error(read_examples)
  count = records.write_jsonl(_OUTPUT.value, examples)
  per_language = records.ParallelCorpus.from_examples(examples).examples_per_language()
  print(f"wrote {count} ids to {_OUTPUT.value}; ids per language: {per_language}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
