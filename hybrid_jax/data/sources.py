"""Data sources -> a `ParallelCorpus`: synthetic, LAReQA directories, parallel-examples JSONL, and
the XQuAD-R / MLQA-R TFDS builders (tfds_builders.py; data.path = "xquad_r" | "mlqa_r").

`load_corpus(config.data)` is the one entry point. LAReQA (XQuAD-R, MLQA-R) training pairs come
from `lareqa.training_examples` (query -> the sentence holding the answer, optionally followed by
its paragraph with data.passage_with_context; hard negative = a neighbouring sentence), the same
pairs the converter writes and the TFDS builders store.
"""

from __future__ import annotations

import os

import numpy as np

from hybrid_jax.data import lareqa
from hybrid_jax.data import locations
from hybrid_jax.data import records
from hybrid_jax.data import synthetic

SOURCES = ("synthetic", "lareqa", "jsonl", "tfds")


def resolve_path(path: str) -> str:
  """A path as given if it exists, else relative to the data directory (locations.data_root)."""
  if not path or os.path.exists(path) or os.path.isabs(path):
    return path
  under_root = os.path.join(locations.data_root(), path)
  return under_root if os.path.exists(under_root) else path


VALIDATION_UNITS = ("auto", "id", "article", "paragraph")


def validation_unit(data_config) -> str:
  """data.validation_unit resolved: "auto" is "article" for LAReQA (whose ids share gold
  sentences within an article: split by id, 77 of XQuAD-R's 93 validation ids had a gold
  sentence that a training id also had) and "id" for every other source."""
  unit = data_config.get("validation_unit", "auto")
  if unit not in VALIDATION_UNITS:
    raise records.DataError(f"data.validation_unit must be one of {VALIDATION_UNITS}, found "
                            f"{unit!r}")
  if unit == "auto":
    return "article" if data_config.source == "lareqa" else "id"
  if unit != "id" and data_config.source != "lareqa":
    raise records.DataError(
        f"data.validation_unit={unit!r} groups ids by {unit}, which only data.source='lareqa' "
        f"knows (found {data_config.source!r}); use 'id' or 'auto'.")
  return unit


def _join_groups_through_negatives(corpus: records.ParallelCorpus, groups: list[str]) -> list[str]:
  """Groups joined where a row's hard negative is another group's gold sentence (one-sentence
  articles take their negative from the next article: MLQA-R, 125 rows), so that a validation
  gold sentence is not a training negative either."""
  parent = {g: g for g in groups}

  def find(g):
    while parent[g] != g:
      parent[g] = parent[parent[g]]
      g = parent[g]
    return g

  if corpus.positive_ids is None or corpus.negative_ids is None:
    return groups
  group_of_gold = {}
  for row, uids in enumerate(corpus.positive_ids):
    for uid in uids:
      if uid is not None:
        group_of_gold.setdefault(uid, groups[row])
  for row, uids in enumerate(corpus.negative_ids):
    for uid in uids:
      other = group_of_gold.get(uid)
      if other is not None:
        a, b = find(groups[row]), find(other)
        if a != b:
          parent[max(a, b)] = min(a, b)
  return [find(g) for g in groups]


def validation_mask(corpus: records.ParallelCorpus, data_config) -> np.ndarray:
  """[N] bool: the corpus's validation ids (data.validation_fraction, whole groups when the
  corpus has them: data.validation_unit). Training, `data.plan` and the tests use this one rule."""
  return records.validation_ids_mask(corpus.ids, data_config.validation_fraction, corpus.groups)


def load_corpus(data_config) -> records.ParallelCorpus:
  """Reads `config.data.source` with its languages; validation split and sampling come later."""
  source = data_config.source
  languages = tuple(data_config.languages)
  validation_unit(data_config)  # a bad value fails here, whatever the source
  heldout = lareqa.HeldoutSplit.from_config(data_config).validate()
  if heldout.fraction and source != "lareqa":
    raise records.DataError(
        f"data.heldout_fraction={heldout.fraction} holds out whole articles, which only "
        f"data.source='lareqa' knows (found {source!r}). Set data.heldout_fraction=0, or train "
        "from the LAReQA directory (data.source=lareqa, data.path=mlqa-r).")
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
    examples = lareqa.training_examples(path, languages, data_config.passage_with_context,
                                        heldout=heldout)
    if heldout.fraction:
      path += (f" (train part: {heldout.fraction:g} of the ids held out by {heldout.unit}, "
               f"seed {heldout.seed})")
    corpus = records.ParallelCorpus.from_examples(examples, languages, source=path)
    unit = validation_unit(data_config)
    if unit != "id":
      groups = lareqa.id_groups(resolve_path(data_config.path), unit)
      corpus.groups = _join_groups_through_negatives(corpus, [groups[i] for i in corpus.ids])
    return corpus
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
