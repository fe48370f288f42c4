"""The embeddings exchange format: round trip, alignment by uid, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_jax.eval import embeddings_io


def _write(directory, q_uids, q, c_uids, c):
  embeddings_io.save(str(directory), "queries", q_uids, q)
  embeddings_io.save(str(directory), "candidates", c_uids, c)


def test_round_trip_and_alignment_by_uid(tmp_path):
  q = np.arange(6, dtype=np.float32).reshape(3, 2)
  c = np.arange(8, dtype=np.float32).reshape(4, 2)
  _write(tmp_path, ["a", "b", "c"], q, ["w", "x", "y", "z"], c)
  # The collection wants another order and fewer candidates: rows follow the wanted uids.
  q2, c2 = embeddings_io.load_for(str(tmp_path), ["c", "a", "b"], ["z", "w"])
  np.testing.assert_array_equal(q2, q[[2, 0, 1]])
  np.testing.assert_array_equal(c2, c[[3, 0]])


def test_uid_file_not_matching_array(tmp_path):
  _write(tmp_path, ["a", "b"], np.zeros((2, 4)), ["x"], np.zeros((1, 4)))
  (tmp_path / "queries.uids.txt").write_text("a\nb\nc\n")
  with pytest.raises(embeddings_io.EmbeddingsError,
                     match=r"queries\.uids\.txt has 3 uids but .*queries\.npy has 2 rows"):
    embeddings_io.load_for(str(tmp_path), ["a"], ["x"])


def test_different_widths(tmp_path):
  _write(tmp_path, ["a"], np.zeros((1, 4)), ["x"], np.zeros((1, 3)))
  with pytest.raises(embeddings_io.EmbeddingsError,
                     match=r"query embeddings have width 4 but candidate embeddings have width 3"):
    embeddings_io.load_for(str(tmp_path), ["a"], ["x"])


def test_missing_uids_files_and_bad_values(tmp_path):
  _write(tmp_path, ["a"], np.ones((1, 2)), ["x"], np.ones((1, 2)))
  with pytest.raises(embeddings_io.EmbeddingsError, match=r"1 of the collection's 2 query uids "
                     r"have no embedding, e.g. \['b'\]"):
    embeddings_io.load_for(str(tmp_path), ["a", "b"], ["x"])
  np.save(tmp_path / "candidates.npy", np.array([[np.nan, 1.0]], np.float32))
  with pytest.raises(embeddings_io.EmbeddingsError, match=r"NaN or inf.*'x'"):
    embeddings_io.load_for(str(tmp_path), ["a"], ["x"])
  np.save(tmp_path / "candidates.npy", np.ones(3, np.float32))
  with pytest.raises(embeddings_io.EmbeddingsError, match=r"expected a 2-D float array"):
    embeddings_io.load_for(str(tmp_path), ["a"], ["x"])
  (tmp_path / "candidates.npy").write_bytes(b"not numpy")
  with pytest.raises(embeddings_io.EmbeddingsError, match=r"cannot read .*candidates\.npy"):
    embeddings_io.load_for(str(tmp_path), ["a"], ["x"])
  (tmp_path / "candidates.npy").unlink()
  with pytest.raises(embeddings_io.EmbeddingsError, match=r"candidates\.npy does not exist"):
    embeddings_io.load_for(str(tmp_path), ["a"], ["x"])
  (tmp_path / "queries.uids.txt").write_text("a\na\n")
  np.save(tmp_path / "queries.npy", np.ones((2, 2), np.float32))
  with pytest.raises(embeddings_io.EmbeddingsError, match=r"duplicate uids"):
    embeddings_io.load(str(tmp_path), "queries")
