r"""TFDS builders for XQuAD-R and MLQA-R (LAReQA) that read a local `manual_dir`, never a download.

Each record is one parallel example (records.py), in the languages whose file holds the id:

    {"id": str, "languages": Sequence({"language": str, "query": str, "positive": str,
                                       "negative": str})}      # negative "" if there is none

built by `lareqa.training_examples` (query -> the sentence holding the answer; hard negative = a
neighbouring sentence). Builder configs: "sentence" (default, passage = the gold sentence) and
"with_context" (passage = sentence + " " + its paragraph, LAReQA's candidate encoding). One split,
"train", holds every id in file order (shuffling disabled); hybrid_jax takes its validation ids out
by id hash later, as for every source. Both sets are evaluation sets upstream: train on one, evaluate
on the other.

manual_dir is the folder with the `<lang>.json` files (e.g. ~/.cache/hybrid_jax/data/mlqa-r) or a folder
with an `xquad-r/` / `mlqa-r/` subfolder (e.g. the data directory of data/locations.py), so one manual_dir serves both builders.

Prepare once (one process; on a pod before training, into a shared data_dir):

    python -m hybrid_jax.data.tfds_builders --datasets=xquad_r,mlqa_r \
        --data_dir=~/tensorflow_datasets --manual_dir=~/.cache/hybrid_jax/data

and train from them with `--config.data.source=tfds --config.data.path=mlqa_r`
(`config.data.tfds_data_dir`; a dataset not yet prepared is prepared from
`config.data.tfds_manual_dir`, default the shared data root).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

import tensorflow_datasets as tfds

from hybrid_jax import errors
from hybrid_jax.data import lareqa
from hybrid_jax.data import locations
from hybrid_jax.data import records
from hybrid_jax.data import tf_runtime

_VERSION = tfds.core.Version("1.0.0")
_HOMEPAGE = "https://github.com/google-research-datasets/lareqa"
_CITATION = """@inproceedings{roy-etal-2020-lareqa,
  title = {{LAReQA}: Language-Agnostic Answer Retrieval from a Multilingual Pool},
  author = {Roy, Uma and Constant, Noah and Al-Rfou, Rami and Barua, Aditya and Phillips, Aaron
            and Yang, Yinfei},
  booktitle = {Proceedings of EMNLP 2020},
  year = {2020}}"""


@dataclasses.dataclass(eq=False)
class LareqaConfig(tfds.core.BuilderConfig):
  with_context: bool = False  # passage = gold sentence + " " + paragraph


_CONFIGS = [
    LareqaConfig(name="sentence", version=_VERSION,
                 description="passage = the sentence holding the answer"),
    LareqaConfig(name="with_context", version=_VERSION, with_context=True,
                 description="passage = the sentence holding the answer + ' ' + its paragraph"),
]


def resolve_manual_dir(manual_dir: str, folder: str, languages: Sequence[str]) -> str:
  """The directory holding `<lang>.json` for every language, or a clear error."""
  for candidate in (manual_dir, os.path.join(manual_dir, folder)):
    if all(os.path.isfile(os.path.join(candidate, f"{lang}.json")) for lang in languages):
      return candidate
  found = sorted(f for f in os.listdir(manual_dir)) if os.path.isdir(manual_dir) else None
  raise records.DataError(
      f"manual_dir {manual_dir!r} holds neither the {folder} files "
      f"{[f'{lang}.json' for lang in languages]} nor a {folder}/ folder with them (found: "
      f"{found if found is not None else 'no such directory'}). Point manual_dir at the folder "
      f"with the LAReQA files (e.g. $HYBRID_JAX_DATA/{folder}, or $HYBRID_JAX_DATA); "
      f"`{locations.FETCH_COMMAND}` downloads them from {_HOMEPAGE}.")


class _LareqaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared code of the two LAReQA builders; subclasses set the folder and the languages."""

  VERSION = _VERSION
  RELEASE_NOTES = {"1.0.0": "Parallel examples: query, gold sentence, neighbour-sentence negative."}
  BUILDER_CONFIGS = _CONFIGS
  FOLDER: str = ""
  LANGUAGES: tuple[str, ...] = ()
  LICENSE: str = ""

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{self.FOLDER} (LAReQA) as parallel question -> answer-sentence examples in "
                     f"{len(self.LANGUAGES)} languages; an id lists only the languages that hold it."),
        features=tfds.features.FeaturesDict({
            "id": text,
            "languages": tfds.features.Sequence({"language": text, "query": text,
                                                 "positive": text, "negative": text}),
        }),
        disable_shuffling=True,  # file order, so records equal lareqa.training_examples
        homepage=_HOMEPAGE, citation=_CITATION, license=self.LICENSE)

  def _split_generators(self, dl_manager):
    directory = resolve_manual_dir(os.fspath(dl_manager.manual_dir), self.FOLDER, self.LANGUAGES)
    return {"train": self._generate_examples(directory)}

  def _generate_examples(self, directory: str):
    examples = lareqa.training_examples(directory, self.LANGUAGES,
                                         self.builder_config.with_context)
    for example in examples:
      yield example.id, {"id": example.id, "languages": [
          {"language": lang, "query": t.query, "positive": t.positive, "negative": t.negative or ""}
          for lang, t in example.languages.items()]}


class XquadR(_LareqaBuilder):
  """XQuAD-R: 1190 ids, each in all 11 languages (CC BY-SA 4.0)."""

  FOLDER = "xquad-r"
  LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")
  LICENSE = "CC BY-SA 4.0"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the xquad-r files (ar de el en es hi ru th tr vi zh .json) from "
      f"{_HOMEPAGE} (folder xquad-r/) in manual_dir or manual_dir/xquad-r/.")


class MlqaR(_LareqaBuilder):
  """MLQA-R: 1148 ids, each in 2 to 4 of 7 languages (CC BY-NC 4.0)."""

  FOLDER = "mlqa-r"
  LANGUAGES = ("ar", "de", "en", "es", "hi", "vi", "zh")
  LICENSE = "CC BY-NC 4.0"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the mlqa-r files (ar de en es hi vi zh .json) from the history of "
      f"{_HOMEPAGE} (commit 354d67d, folder mlqa-r/) in manual_dir or manual_dir/mlqa-r/.")


BUILDERS = {"xquad_r": XquadR, "mlqa_r": MlqaR}


def builder(name: str, data_dir: str | None = None,
            with_context: bool = False) -> tfds.core.DatasetBuilder:
  """The builder of "xquad_r" | "mlqa_r" (config from with_context) over data_dir."""
  if name not in BUILDERS:
    raise records.DataError(f"unknown LAReQA TFDS dataset {name!r}; known: {sorted(BUILDERS)}")
  return BUILDERS[name](data_dir=data_dir or None,
                        config="with_context" if with_context else "sentence")


def prepare(dataset_builder: tfds.core.DatasetBuilder, manual_dir: str) -> None:
  """Writes the dataset from manual_dir if it is not prepared yet (never downloads)."""
  if dataset_builder.is_prepared():
    return
  cls = type(dataset_builder)
  resolve_manual_dir(manual_dir, cls.FOLDER, cls.LANGUAGES)  # a clear error before TFDS starts
  tf_runtime.import_tensorflow()  # TF's thread and device limits, before TFDS starts TF
  print(f"preparing TFDS {dataset_builder.info.full_name} in {dataset_builder.data_dir} from "
        f"{manual_dir}", file=sys.stderr, flush=True)
  dataset_builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))


def read_examples(dataset_builder: tfds.core.DatasetBuilder,
                  split: str = "train") -> list[records.ParallelExample]:
  """The records of a prepared builder as ParallelExamples (file order)."""
  tf_runtime.import_tensorflow()  # TF's thread and device limits, before TFDS starts TF
  examples = []
  for record in tfds.as_numpy(dataset_builder.as_dataset(split=split)):
    entries = record["languages"]
    languages = {}
    for lang, query, positive, negative in zip(entries["language"], entries["query"],
                                               entries["positive"], entries["negative"]):
      languages[lang.decode("utf-8")] = records.LanguageTexts(
          query.decode("utf-8"), positive.decode("utf-8"), negative.decode("utf-8") or None)
    examples.append(records.ParallelExample(record["id"].decode("utf-8"), languages))
  return examples


def load_examples(name: str, data_dir: str = "", manual_dir: str = "",
                  with_context: bool = False) -> list[records.ParallelExample]:
  """Prepares (from manual_dir, default the data directory) if needed, then reads."""
  dataset_builder = builder(name, data_dir, with_context)
  prepare(dataset_builder, locations.data_root(manual_dir))
  return read_examples(dataset_builder)


def main(argv: Sequence[str] | None = None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--datasets", default="xquad_r,mlqa_r", help="comma-separated names")
  parser.add_argument("--data_dir", default="", help="TFDS data_dir (default: TFDS's own)")
  parser.add_argument("--manual_dir", default="", help="LAReQA files (default: "
                      "$HYBRID_JAX_DATA, else ~/.cache/hybrid_jax/data)")
  parser.add_argument("--with_context", action="store_true", help="the with_context config")
  args = parser.parse_args(argv)
  try:
    for name in args.datasets.split(","):
      dataset_builder = builder(name.strip(), args.data_dir, args.with_context)
      prepare(dataset_builder, locations.data_root(args.manual_dir))
      print(f"{dataset_builder.info.full_name}: {dataset_builder.info.splits['train'].num_examples}"
            f" ids in {dataset_builder.data_dir}", file=sys.stderr)
  except errors.UserError as e:  # data and LAReQA-format errors: one line, no traceback
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
