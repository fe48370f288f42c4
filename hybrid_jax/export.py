r"""Exports a training run's parameters as a Hugging Face checkpoint directory.

    python -m hybrid_jax.export --workdir=DIR [--step=best|last|N] --out=HF_DIR

HF_DIR gets config.json, model.safetensors and the tokenizer files; PyTorch loads it with
`transformers.AutoModel.from_pretrained(HF_DIR)`, and hybrid_jax with `--model=HF_DIR`.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from hybrid_jax import errors

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.")
_STEP = flags.DEFINE_string("step", "best", "best (lowest validation loss) | last | a step number.")
_OUT = flags.DEFINE_string("out", None, "Output Hugging Face model directory.")
flags.mark_flags_as_required(["workdir", "out"])


def export(workdir: str, out_dir: str, step: str = "best") -> int:
  """Writes the checkpoint `step` of `workdir` to `out_dir`; returns the step exported."""
  from hybrid_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top
  loaded = checkpointing.load_params(workdir, step)
  hf_checkpoint.save_pretrained(out_dir, loaded.config, loaded.params, loaded.tokenizer)
  return loaded.step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  step = errors.exit_on_user_error(lambda: export(_WORKDIR.value, _OUT.value, _STEP.value))
  print(f"exported step {step} of {_WORKDIR.value} to {_OUT.value}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
