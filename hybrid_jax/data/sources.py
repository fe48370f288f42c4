"""Data sources -> a `ParallelCorpus`: synthetic, LAReQA directories, parallel-examples JSONL, and
the XQuAD-R / MLQA-R TFDS builders (tfds_builders.py; data.path = "xquad_r" | "mlqa_r").

`load_corpus(config.data)` is the one entry point; `lareqa_examples` is also used by the converter
and the TFDS builders.

LAReQA (XQuAD-R, MLQA-R) as training pairs: for every question, query = the question and positive
= the sentence holding its answer (LAReQA's gold candidate), optionally followed by a space and its
paragraph (`with_context`, the way LAReQA encodes a candidate). The hard negative is a neighbouring
sentence of the same paragraph (the next one, else the previous one; a one-sentence paragraph uses
the first sentence of the next paragraph). An id is paired only in the languages whose file holds
it: MLQA-R ids exist in 2 to 4 of its 7 languages.
"""

from __future__ import annotations

import os
from typing import Sequence

from hybrid_jax.data import lareqa
from hybrid_jax.data import records
from hybrid_jax.data import synthetic

SOURCES = ("synthetic", "lareqa", "jsonl", "tfds")


def resolve_path(path: str) -> str:
  """A path as given if it exists, else relative to the shared data root ($HYBRID_JAX_DATA)."""
  if not path or os.path.exists(path) or os.path.isabs(path):
    return path
  under_root = os.path.join(lareqa.default_data_root(), path)
  return under_root if os.path.exists(under_root) else path


def _passage(candidate: lareqa.Candidate, with_context: bool) -> str:
  return f"{candidate.sentence} {candidate.context}" if with_context else candidate.sentence


def lareqa_examples(data_dir: str, languages: Sequence[str] | None = None,
                    with_context: bool = False) -> list[records.ParallelExample]:
  """One parallel example per question id over the LAReQA files of `languages` (default: all).

  Ids are ordered by first appearance, scanning the languages in order.
  """
  parsed = lareqa.read_languages(data_dir, languages or None)
  by_id: dict[str, dict[str, records.LanguageTexts]] = {}
  for lang, data in parsed.items():
    position = {c.uid: i for i, c in enumerate(data.candidates)}
    seen: set[str] = set()
    for question in data.questions:
      if question.id in seen:
        raise records.DataError(f"{data.path}: question id {question.id!r} occurs twice; LAReQA "
                                "files hold each id once per language")
      seen.add(question.id)
      i = position[question.gold_uid]
      gold = data.candidates[i]
      negative = _neighbour(data.candidates, i)
      by_id.setdefault(question.id, {})[lang] = records.LanguageTexts(
          question.question, _passage(gold, with_context),
          _passage(negative, with_context) if negative is not None else None)
  return [records.ParallelExample(qid, langs) for qid, langs in by_id.items()]


def _neighbour(candidates: list[lareqa.Candidate], i: int) -> lareqa.Candidate | None:
  """A sentence of the same paragraph next to candidates[i], else the next paragraph's first."""
  gold = candidates[i]
  for j in (i + 1, i - 1):
    if 0 <= j < len(candidates) and candidates[j].paragraph == gold.paragraph:
      return candidates[j]
  if len(candidates) < 2:
    return None
  j = i + 1
  while j % len(candidates) != i and candidates[j % len(candidates)].paragraph == gold.paragraph:
    j += 1
  return candidates[j % len(candidates)]


def load_corpus(data_config) -> records.ParallelCorpus:
  """Reads `config.data.source` with its languages; validation split and sampling come later."""
  source = data_config.source
  languages = tuple(data_config.languages)
  if source == "synthetic":
    spec = synthetic.SyntheticSpec.from_config(data_config.synthetic)
    spec.validate()
    return records.ParallelCorpus.from_examples(
        synthetic.training_examples(spec), languages or spec.languages,
        source=f"(seed {spec.seed}, {spec.num_languages} languages, {spec.num_entities} entities x "
        f"{spec.num_relations} relations)")
  if source == "lareqa":
    path = resolve_path(data_config.path)
    if not path:
      raise records.DataError(
          "data.source='lareqa' needs data.path: a directory with one <lang>.json per language, "
          "e.g. 'mlqa-r' (under $HYBRID_JAX_DATA) or an absolute path.")
    if languages:
      available = lareqa.available_languages(path)
      unknown = [lang for lang in languages if lang not in available]
      if unknown:
        raise records.DataError(
            f"data.languages names {unknown}, which {path} has no <lang>.json for. Languages "
            f"present: {available}. Fix data.languages (or leave it empty for all).")
    examples = lareqa_examples(path, languages, data_config.passage_with_context)
    return records.ParallelCorpus.from_examples(examples, languages, source=path)
  if source == "jsonl":
    path = resolve_path(data_config.path)
    if not path:
      raise records.DataError("data.source='jsonl' needs data.path: a parallel-examples JSONL file.")
    return records.ParallelCorpus.from_examples(records.read_jsonl(path), languages, source=path)
  if source == "tfds":
    # Imported here: TFDS (and TensorFlow behind it) is only needed by this source.
    from hybrid_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
    examples = tfds_builders.load_examples(
        data_config.path, data_config.get("tfds_data_dir", ""),
        data_config.get("tfds_manual_dir", ""), data_config.passage_with_context)
    return records.ParallelCorpus.from_examples(
        examples, languages, source=f"TFDS {data_config.path} "
        f"({data_config.get('tfds_data_dir') or 'default data_dir'})")
  raise records.DataError(f"data.source must be one of {SOURCES}, found {source!r}")
