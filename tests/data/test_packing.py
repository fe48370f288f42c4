"""Packer: first-fit decreasing layout, determinism, every text once and contiguous, clear errors,
and the choice of the row count."""

import numpy as np
import pytest

from hybrid_jax import errors
from hybrid_jax.data import packing

PAD = 1


def _sequences(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 1000, size=n).astype(np.int32) for n in lengths]


def _unpack(packed: packing.PackedBatch) -> list[np.ndarray]:
  """Each text's ids read back from the packed arrays through its (row, segment)."""
  return [packed.input_ids[r][packed.segment_ids[r] == s] for r, s in packed.segment_index]


def test_first_fit_decreasing_layout_by_hand():
  # Decreasing: 7 (text 1), 5 (text 0), 5 (text 3, tie after text 0), 4 (text 2), 2 (text 4).
  # 7 -> row 0 [7]; 5 -> row 1 [5]; 5 -> row 1 [10]; 4 -> row 2 (row 0 has 3 left); 2 -> row 0.
  row, offset = packing.first_fit_decreasing([5, 7, 4, 5, 2], row_length=10)
  np.testing.assert_array_equal(row, [1, 0, 2, 1, 0])
  np.testing.assert_array_equal(offset, [0, 0, 0, 5, 7])
  packed = packing.pack(_sequences([5, 7, 4, 5, 2]), num_rows=4, row_length=10, pad_token_id=PAD)
  np.testing.assert_array_equal(packed.segment_index, [[1, 1], [0, 1], [2, 1], [1, 2], [0, 2]])
  np.testing.assert_array_equal(packed.segment_ids[0], [1] * 7 + [2] * 2 + [0])
  np.testing.assert_array_equal(packed.segment_positions[0], [0, 1, 2, 3, 4, 5, 6, 0, 1, 0])
  np.testing.assert_array_equal(packed.segment_ids[3], [0] * 10)  # the spare row is padding
  assert (packed.input_ids[3] == PAD).all() and packed.input_ids[0, 9] == PAD
  assert packed.rows_used == 3 and packed.num_real_tokens == 23
  assert packing.rows_needed([5, 7, 4, 5, 2], 10) == 3 and packing.rows_needed([], 10) == 0


def test_every_text_exactly_once_contiguous_and_in_order():
  rng = np.random.default_rng(3)
  lengths = np.concatenate([rng.integers(4, 40, size=32), rng.integers(10, 96, size=32)])
  sequences = _sequences(lengths, seed=1)
  packed = packing.pack(sequences, num_rows=24, row_length=128, pad_token_id=PAD)
  assert packed.input_ids.shape == packed.segment_ids.shape == (24, 128)
  assert packed.input_ids.dtype == packed.segment_ids.dtype == np.int32
  # (row, segment) pairs are distinct and name every non-padding segment: each text once.
  pairs = {tuple(p) for p in packed.segment_index}
  assert len(pairs) == len(sequences)
  present = {(r, s) for r in range(24) for s in np.unique(packed.segment_ids[r]) if s}
  assert present == pairs
  for n, (r, s) in enumerate(packed.segment_index):
    columns = np.flatnonzero(packed.segment_ids[r] == s)
    # Contiguous from the recorded offset, positions 0..n-1, the text's own ids.
    np.testing.assert_array_equal(columns, packed.offsets[n] + np.arange(lengths[n]))
    np.testing.assert_array_equal(packed.segment_positions[r, columns], np.arange(lengths[n]))
    np.testing.assert_array_equal(packed.input_ids[r, columns], sequences[n])
  # Segments of a row are numbered 1, 2, ... left to right, padding only at the end of a row.
  for r in range(24):
    ids = packed.segment_ids[r]
    real = ids[ids > 0]
    np.testing.assert_array_equal(np.unique(real), np.arange(1, len(np.unique(real)) + 1))
    assert (np.diff(real) >= 0).all() and (ids[len(real):] == 0).all()
  assert packed.num_real_tokens == int(lengths.sum()) == int((packed.segment_ids > 0).sum())
  # Nearly as few rows as the token count allows.
  assert packed.rows_used <= np.ceil(lengths.sum() / 128) + 1


def test_deterministic_and_a_function_of_the_lengths_only():
  lengths = [9, 3, 9, 17, 3, 3, 30, 9, 12, 1]
  first = packing.pack(_sequences(lengths, seed=0), 6, 32, PAD)
  again = packing.pack(_sequences(lengths, seed=0), 6, 32, PAD)
  other_ids = packing.pack(_sequences(lengths, seed=5), 6, 32, PAD)
  for field in ("segment_ids", "segment_positions", "segment_index", "offsets"):
    np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    np.testing.assert_array_equal(getattr(first, field), getattr(other_ids, field))
  np.testing.assert_array_equal(first.input_ids, again.input_ids)
  # Ties go by index: the three 9-token texts (0, 2, 7) take segments in that order.
  assert [tuple(first.segment_index[i]) for i in (0, 2, 7)] == sorted(
      tuple(first.segment_index[i]) for i in (0, 2, 7))
  for n, text in enumerate(_unpack(first)):
    assert len(text) == lengths[n]


def test_sequences_from_padded_round_trip():
  ids = np.array([[2, 5, 6, 3, 1, 1], [2, 7, 3, 1, 1, 1], [2, 8, 9, 9, 9, 3]], np.int32)
  mask = (ids != 1).astype(np.int32)
  sequences = packing.sequences_from_padded(ids, mask)
  assert [s.tolist() for s in sequences] == [[2, 5, 6, 3], [2, 7, 3], [2, 8, 9, 9, 9, 3]]
  packed = packing.pack(sequences, 2, 8, pad_token_id=1)
  assert [t.tolist() for t in _unpack(packed)] == [s.tolist() for s in sequences]


def test_overflow_errors_name_the_numbers_and_the_fix():
  with pytest.raises(packing.PackingError,
                     match=r"text 2 has 40 tokens but packed rows hold 32 \(of 3 texts, 1 are "
                           r"longer\): raise the packing row length to at least 40"):
    packing.pack(_sequences([5, 6, 40]), 4, 32, PAD)
  # 6 texts of 20 tokens: two per row of 48, so 3 rows; only 2 given.
  with pytest.raises(packing.PackingError,
                     match=r"6 texts with 120 tokens \(longest 20\) need 3 packed rows of 48 "
                           r"tokens .* at least 3 by token count\), but the packed shape has only "
                           r"2 rows: raise the packing rows to >= 3"):
    packing.pack(_sequences([20] * 6), 2, 48, PAD)
  assert issubclass(packing.PackingError, errors.UserError)
  with pytest.raises(packing.PackingError, match="text 1 is empty"):
    packing.pack([np.array([2, 3]), np.array([], np.int32)], 2, 8, PAD)


def test_choose_num_rows_takes_the_worst_batch_with_margin_and_divisor():
  batches = [[10] * 8, [30] * 8, [16] * 8]  # rows of 64: 2, 4 (two 30s per row), 2
  choice = packing.choose_num_rows(batches, row_length=64)
  assert (choice.max_needed, choice.num_rows, choice.num_batches) == (4, 5, 3)  # ceil(4 * 1.1)
  assert choice.mean_needed == pytest.approx(8 / 3) and choice.max_real_tokens == 240
  assert packing.choose_num_rows(batches, 64, margin=1.0, multiple_of=8).num_rows == 8
  assert packing.choose_num_rows([[10] * 60], 64, margin=1.1).num_rows == 11  # 10 rows * 1.1
  assert "5 rows x 64 tokens" in choice.summary() and "at most 4 over 3" in choice.summary()
  # Every sampled batch then packs into the chosen shape.
  for lengths in batches:
    packing.pack(_sequences(lengths), choice.num_rows, 64, PAD)
  with pytest.raises(packing.PackingError, match="margin must be >= 1"):
    packing.choose_num_rows(batches, 64, margin=0.9)
  with pytest.raises(packing.PackingError, match="at least one sampled batch"):
    packing.choose_num_rows([], 64)
