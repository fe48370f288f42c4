"""python -m hybrid_jax.embed: rows vs TextEmbedder and PyTorch, input order, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from eval.eval_helpers import torch_mean_pooled, write_tiny_model  # tests/eval/eval_helpers.py
from hybrid_jax import embed
from hybrid_jax.models import inference

_WORDS = "red green blue cyan magenta yellow black white orange purple brown pink".split()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _texts(n: int = 30, seed: int = 0) -> list[str]:
  """Mixed lengths (1-40 words, so rows are reordered into buckets), an empty line, unknowns."""
  rng = np.random.default_rng(seed)
  texts = [" ".join(rng.choice(_WORDS, size=int(rng.integers(1, 40)))) for _ in range(n)]
  texts[4] = ""
  texts[9] = "Grün, bleu? 红色"
  return texts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return write_tiny_model(str(tmp_path_factory.mktemp("tiny")), [" ".join(_WORDS), "query :"])


def test_cli_rows_equal_text_embedder_and_pytorch(model_dir, tmp_path):
  texts = _texts()
  input_path = tmp_path / "texts.txt"
  input_path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
  output = tmp_path / "out" / "emb.npy"
  result = subprocess.run(
      [sys.executable, "-m", "hybrid_jax.embed", f"--model={model_dir}", f"--input={input_path}",
       f"--output={output}", "--prefix=query: ", "--max_length=32", "--batch_size=16"],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert "embedding: 30/30 texts" in result.stderr and "ETA" in result.stderr
  rows = np.load(output)
  assert rows.shape == (30, 32) and rows.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-6)
  direct = inference.TextEmbedder.from_pretrained(model_dir, max_length=32, batch_size=16).embed(
      texts, prefix="query: ")
  np.testing.assert_allclose(rows, direct, atol=1e-6)
  reference = torch_mean_pooled(model_dir, texts, prefix="query: ", max_length=32)
  assert np.max(np.abs(rows - reference)) <= 1e-5
  # Input order: each row is its own line's embedding (lines differ, so rows differ).
  assert np.all(np.argmax(rows @ reference.T, axis=1) == np.arange(30))


def test_read_texts_keeps_lines_aligned(tmp_path):
  path = tmp_path / "t.txt"
  path.write_bytes("\ufeffone\r\n\n  three  \nfour".encode("utf-8"))
  assert embed.read_texts(str(path)) == ["one", "", "  three  ", "four"]


def test_clear_errors(model_dir, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(embed.EmbedError, match=r"empty\.txt'? is empty"):
    embed.embed_file(model_dir, str(empty), str(tmp_path / "e.npy"))
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
  with pytest.raises(embed.EmbedError, match=r"is not UTF-8"):
    embed.embed_file(model_dir, str(binary), str(tmp_path / "e.npy"))
  with pytest.raises(embed.EmbedError, match=r"does not exist"):
    embed.embed_file(model_dir, str(tmp_path / "missing.txt"), str(tmp_path / "e.npy"))
  with pytest.raises(embed.EmbedError, match=r"--model=.* is not a directory"):
    embed.embed_file(str(tmp_path / "no_model"), str(binary), str(tmp_path / "e.npy"))
  assert not os.path.exists(tmp_path / "e.npy")
  # The command line reports the same errors, with exit status 2 and no traceback.
  result = subprocess.run(
      [sys.executable, "-m", "hybrid_jax.embed", f"--model={model_dir}", f"--input={empty}",
       f"--output={tmp_path / 'e.npy'}"], capture_output=True, text=True, cwd=REPO, timeout=120,
      check=False)
  assert result.returncode == 2
  assert "error:" in result.stderr and "is empty" in result.stderr
  assert "Traceback" not in result.stderr
