r"""Exports a model as a Hugging Face directory that transformers and sentence-transformers load.

    python -m hybrid_jax.export --workdir=RUN_DIR [--step=best|last|N] --out=DIR
    python -m hybrid_jax.export --model=HF_DIR --query_prefix="query: " \
        --passage_prefix="passage: " --out=DIR          # label an existing HF directory (a copy)

DIR gets config.json, model.safetensors and the tokenizer files (PyTorch:
`transformers.AutoModel.from_pretrained(DIR)`; hybrid_jax: `--model=DIR` / `init_from`), and the
sentence-transformers files (models/sentence_transformers_files.py): the run's pooling, L2
normalisation, max_seq_length and the prompts "query", "passage" and "document" from the run's
config.data prefixes, so that `SentenceTransformer(DIR).encode(texts, prompt_name="query")` gives
hybrid_jax's embeddings (and MTEB, which loads SentenceTransformer models, scores the same model).
`--nosentence_transformers` writes the Hugging Face files only.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from hybrid_jax import errors
from hybrid_jax import native_log

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory to export.")
_MODEL = flags.DEFINE_string("model", None, "Instead of --workdir: a Hugging Face model directory "
                             "(e.g. the converted multilingual-e5-small), copied to --out with the "
                             "sentence-transformers files added.")
_STEP = flags.DEFINE_string("step", "best", "best (lowest validation loss) | last | a step number.")
_OUT = flags.DEFINE_string("out", None, "Output model directory.")
_SENTENCE_TRANSFORMERS = flags.DEFINE_bool(
    "sentence_transformers", True, "Also write the sentence-transformers files.")
_MAX_SEQ_LENGTH = flags.DEFINE_integer(
    "max_seq_length", None, "sentence-transformers truncation length (default: with --workdir the "
    "longer of the run's data.query_max_length / passage_max_length, with --model the model's "
    "position table).")
_QUERY_PREFIX = flags.DEFINE_string("query_prefix", None, "The 'query' prompt (default with "
                                    "--workdir: the run's config.data.query_prefix).")
_PASSAGE_PREFIX = flags.DEFINE_string("passage_prefix", None, "The 'passage' and 'document' prompt "
                                      "(default with --workdir: config.data.passage_prefix).")
_POOLING = flags.DEFINE_enum("pooling", None, ["cls", "mean", "pooler"], "With --model: the "
                             "pooling (default: the directory's own, else mean).")
flags.mark_flags_as_required(["out"])


class ExportUsageError(errors.UserError):
  """The export flags contradict each other or lack a value."""


def export(workdir: str, out_dir: str, step: str = "best", *, sentence_transformers: bool = True,
           max_seq_length: int | None = None, query_prefix: str | None = None,
           passage_prefix: str | None = None) -> int:
  """Writes the checkpoint `step` of `workdir` to `out_dir`; returns the step exported.

  The sentence-transformers prompts and length come from the run's config.data unless given."""
  from hybrid_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import sentence_transformers_files  # pylint: disable=g-import-not-at-top
  loaded = checkpointing.load_params(workdir, step)
  settings = None
  if sentence_transformers:
    data = dict(checkpointing.read_run_config(workdir).get("data") or {})
    data.update({k: v for k, v in (("query_prefix", query_prefix),
                                   ("passage_prefix", passage_prefix)) if v is not None})
    settings = sentence_transformers_files.PromptSettings.from_data_config(data, max_seq_length)
    # Checked before anything is written, so a bad setting leaves no half-exported directory.
    sentence_transformers_files.check_exportable(loaded.config, settings, loaded.params)
  hf_checkpoint.save_pretrained(out_dir, loaded.config, loaded.params, loaded.tokenizer)
  if settings is not None:
    sentence_transformers_files.write_files(out_dir, loaded.config, settings, loaded.params)
  return loaded.step


def export_hf_dir(model_dir: str, out_dir: str, *, query_prefix: str | None,
                  passage_prefix: str | None, max_seq_length: int | None = None,
                  pooling: str | None = None) -> None:
  """Copies a Hugging Face directory to `out_dir` with the sentence-transformers files added."""
  from hybrid_jax.models import sentence_transformers_files  # pylint: disable=g-import-not-at-top
  if query_prefix is None or passage_prefix is None:
    raise ExportUsageError(
        "--model needs --query_prefix and --passage_prefix (the model's input prefixes, e.g. "
        "multilingual-e5's 'query: ' and 'passage: '; '' for none): a Hugging Face directory does "
        "not record them.")
  sentence_transformers_files.add_to_hf_dir(
      model_dir, out_dir, query_prefix=query_prefix, passage_prefix=passage_prefix,
      max_seq_length=max_seq_length, pooling=pooling)


def run(workdir: str | None, model_dir: str | None, out_dir: str) -> str:
  """What the command does; returns the line it prints."""
  if (workdir is None) == (model_dir is None):
    raise ExportUsageError("pass exactly one of --workdir (a training run) and --model (a Hugging "
                           f"Face directory); found workdir={workdir!r}, model={model_dir!r}")
  if model_dir is not None:
    if not _SENTENCE_TRANSFORMERS.value:
      raise ExportUsageError("--model only adds the sentence-transformers files; "
                             "--nosentence_transformers would leave nothing to do")
    export_hf_dir(model_dir, out_dir, query_prefix=_QUERY_PREFIX.value,
                  passage_prefix=_PASSAGE_PREFIX.value, max_seq_length=_MAX_SEQ_LENGTH.value,
                  pooling=_POOLING.value)
    return f"wrote {model_dir} with the sentence-transformers files to {out_dir}"
  if _POOLING.value is not None:
    raise ExportUsageError("--pooling applies to --model only; a run exports the pooling it "
                           "trained with")
  step = export(workdir, out_dir, _STEP.value, sentence_transformers=_SENTENCE_TRANSFORMERS.value,
                max_seq_length=_MAX_SEQ_LENGTH.value, query_prefix=_QUERY_PREFIX.value,
                passage_prefix=_PASSAGE_PREFIX.value)
  return f"exported step {step} of {workdir} to {out_dir}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  native_log.quiet_library_info_logs()  # --workdir restores through Orbax
  line = errors.exit_on_user_error(lambda: run(_WORKDIR.value, _MODEL.value, _OUT.value))
  print(line, file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
