r"""Embeds a file of texts with a Hugging Face model directory: one text per line -> [N, D] .npy.

    python -m hybrid_jax.embed --model=HF_DIR --input=texts.txt --output=emb.npy \
        [--pooling=mean] [--prefix="Query: "] [--max_length=128] [--batch_size=64] [--dtype=float32]

Row i of the output is the L2-normalised float32 embedding of line i of the input (UTF-8; the
line break is removed, nothing else: an empty line is an empty text, so rows stay aligned with
line numbers). Encoding is jit-compiled, length-bucketed and sharded over all local devices
(hybrid_jax.models.inference.TextEmbedder); progress and ETA go to stderr. For scripts:
`embed_file(...)` does the same and returns the array.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from hybrid_jax import errors
from hybrid_jax.data import text_files


class EmbedError(errors.UserError):
  """The input file or the output path cannot be used."""


def read_texts(path: str) -> list[str]:
  """One text per line of a UTF-8 file (line breaks removed); errors name the file, and for an
  undecodable byte its line and byte offset. A UTF-8 byte-order mark is not part of the first
  text."""
  hint = "; expected a UTF-8 text file with one text per line."
  text_files.check_file(path, "--input", EmbedError, hint, allow_empty=True)
  if os.path.getsize(path) == 0:
    raise EmbedError(f"--input={path!r} is empty; expected one text per line.")
  content = text_files.read_text(path, "--input", EmbedError, hint)
  lines = content.split("\n")
  if lines[-1] == "":  # the final line break ends the last line; it does not start a new text
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def _write_npy(path: str, array: np.ndarray) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
      np.save(f, array)
    os.replace(tmp, path)  # never leave a half-written array under the output name
  except OSError as e:
    raise EmbedError(f"cannot write --output={path!r}: {e}") from e


def embed_file(model_dir: str, input_path: str, output_path: str, *, pooling: str | None = None,
               prefix: str = "", max_length: int = 128, batch_size: int = 64,
               dtype: str = "float32", show_progress: bool = True) -> np.ndarray:
  """Embeds every line of `input_path` and writes [N, D] float32 to `output_path`; returns it."""
  if not os.path.isdir(model_dir):
    raise EmbedError(f"--model={model_dir!r} is not a directory; expected a Hugging Face model "
                     "directory (config.json, model.safetensors, tokenizer.json). For the "
                     "offline multilingual-e5-small run: python -m hybrid_jax.models.e5_convert")
  if not output_path:
    raise EmbedError("--output is required: the .npy file to write")
  texts = read_texts(input_path)  # read and checked before the model is loaded or compiled

  from hybrid_jax.models import inference  # pylint: disable=g-import-not-at-top

  start = time.time()
  embedder = inference.TextEmbedder.from_pretrained(
      model_dir, pooling=pooling or None, batch_size=batch_size, max_length=max_length,
      dtype=dtype)
  embeddings = embedder.embed(texts, prefix=prefix, desc="embedding" if show_progress else None)
  _write_npy(output_path, embeddings)
  if show_progress:
    print(f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} float32 embeddings to "
          f"{output_path} in {time.time() - start:.1f}s", file=sys.stderr, flush=True)
  return embeddings


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.model or not f.input or not f.output:
    print("error: --model=HF_DIR, --input=texts.txt and --output=emb.npy are required",
          file=sys.stderr)
    sys.exit(2)
  errors.exit_on_user_error(lambda: embed_file(
      f.model, f.input, f.output, pooling=f.pooling, prefix=f.prefix, max_length=f.max_length,
      batch_size=f.batch_size, dtype=f.dtype))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top

  _flags.DEFINE_string("model", "", "Hugging Face model directory.")
  _flags.DEFINE_string("input", "", "UTF-8 text file, one text per line.")
  _flags.DEFINE_string("output", "", "Where to write the [N, D] float32 .npy array.")
  _flags.DEFINE_enum("pooling", "", ["", "cls", "mean", "pooler"],
                     "Pooling (default: the model's own, else mean).")
  _flags.DEFINE_string("prefix", "", "Prepended to every text, e.g. 'query: ' for e5 models.")
  _flags.DEFINE_integer("max_length", 128, "Tokens per text (special tokens included).")
  _flags.DEFINE_integer("batch_size", 64, "Texts per batch over all devices.")
  _flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
  app.run(main)
