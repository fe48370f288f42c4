"""Packing token sequences into fixed `[R, L]` rows, several texts per row (host-side, NumPy).

A padded batch of N texts costs N * max_length tokens however short the texts are; packed, it
costs R * L with R * L close to the real token count. The encoder (models/encoder.py) keeps the
texts apart with `segment_ids` (block-diagonal attention, per-text positions and pooling), so a
packed text's embedding equals its padded one.

    packed = packing.pack(sequences, num_rows=R, row_length=L, pad_token_id=tok.pad_token_id)
    out = Encoder(cfg).apply(params, packed.input_ids, segment_ids=packed.segment_ids,
                             segment_positions=packed.segment_positions,
                             segment_index=packed.segment_index)  # out.embedding: [N, H]

Placement is first-fit decreasing (FFD): texts in order of decreasing length (ties: lower index
first), each into the lowest-numbered row it fits in. It depends only on the lengths, so a batch's
layout is a pure function of its plan, and R and L are static for XLA (one compilation per run).

R for a run: `choose_num_rows` runs FFD on a sample of batches (the run's own plans) and takes the
most rows any of them needed, times a margin, rounded up to a multiple (the number of batch
shards, so that rows split evenly over devices). A batch that still needs more rows than R is a
`PackingError` naming the numbers and the fix, never a silent truncation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

from hybrid_jax import errors


class PackingError(errors.UserError):
  """Texts do not fit the packed shape (a text longer than a row, or more rows than R needed)."""


@dataclasses.dataclass(frozen=True)
class PackedBatch:
  """N texts packed into R rows of L tokens."""
  input_ids: np.ndarray  # [R, L] int32, pad_token_id on padding
  segment_ids: np.ndarray  # [R, L] int32, 0 = padding, 1..S = the row's texts in placement order
  segment_positions: np.ndarray  # [R, L] int32, position within the text (0 on padding)
  segment_index: np.ndarray  # [N, 2] int32, (row, segment id) of text n, in the input order
  offsets: np.ndarray  # [N] int32, column of text n's first token in its row
  lengths: np.ndarray  # [N] int32, tokens of text n

  @property
  def num_rows(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def row_length(self) -> int:
    return int(self.input_ids.shape[1])

  @property
  def num_real_tokens(self) -> int:
    return int(self.lengths.sum())

  @property
  def rows_used(self) -> int:
    """Rows holding at least one text (FFD fills rows in order, so these are the first ones)."""
    return int(self.segment_index[:, 0].max()) + 1 if len(self.segment_index) else 0


def sequences_from_padded(input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
  """The token ids of each row of a padded batch [B, L] (the real tokens: attention_mask 1)."""
  input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
  lengths = attention_mask.astype(bool).sum(axis=1)
  return [input_ids[i, :n] for i, n in enumerate(lengths)]


def _longest_and_check(lengths: np.ndarray, row_length: int) -> None:
  if row_length < 1:
    raise PackingError(f"packing row length must be >= 1, found {row_length}")
  if len(lengths) and lengths.min() < 1:
    raise PackingError(f"text {int(np.argmin(lengths))} is empty; every text has at least its "
                       "special tokens, so an empty one is a tokenization bug")
  if len(lengths) and lengths.max() > row_length:
    longest = int(np.argmax(lengths))
    raise PackingError(
        f"text {longest} has {int(lengths[longest])} tokens but packed rows hold {row_length} "
        f"(of {len(lengths)} texts, {int((lengths > row_length).sum())} are longer): raise the "
        f"packing row length to at least {int(lengths.max())}, or truncate texts to "
        f"{row_length} tokens (data.query_max_length / data.passage_max_length).")


def first_fit_decreasing(lengths: Sequence[int], row_length: int) -> tuple[np.ndarray, np.ndarray]:
  """(row [N], offset [N]) of each text under first-fit decreasing; rows are numbered from 0 in
  the order they are opened. Deterministic: equal lengths are placed in index order."""
  lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
  _longest_and_check(lengths, row_length)
  order = np.argsort(-lengths, kind="stable")  # decreasing length, ties by index
  row = np.empty(len(lengths), np.int32)
  offset = np.empty(len(lengths), np.int32)
  used = np.zeros(len(lengths), np.int64)  # tokens used per opened row; at most N rows
  opened = 0
  for n in order:
    fits = np.flatnonzero(used[:opened] + lengths[n] <= row_length)
    r = int(fits[0]) if len(fits) else opened
    opened += not len(fits)
    row[n], offset[n] = r, used[r]
    used[r] += lengths[n]
  return row, offset


def rows_needed(lengths: Sequence[int], row_length: int) -> int:
  """Rows first-fit decreasing needs for texts of these lengths (0 for no texts)."""
  row, _ = first_fit_decreasing(lengths, row_length)
  return int(row.max()) + 1 if len(row) else 0


def pack(sequences: Sequence[Sequence[int]], num_rows: int, row_length: int,
         pad_token_id: int) -> PackedBatch:
  """Packs N token-id sequences (each a whole tokenised text, special tokens included, already
  truncated) into `num_rows` rows of `row_length` tokens with first-fit decreasing.

  Segment ids of a row are 1, 2, ... in placement order; each text occupies contiguous columns
  offset..offset+length-1, with positions 0..length-1. Rows and columns left over are padding
  (segment 0, pad_token_id). Raises PackingError when a text is longer than row_length or the
  texts need more than num_rows rows.
  """
  sequences = [np.asarray(s, dtype=np.int32).reshape(-1) for s in sequences]
  lengths = np.asarray([len(s) for s in sequences], dtype=np.int32)
  row, offset = first_fit_decreasing(lengths, row_length)
  needed = int(row.max()) + 1 if len(row) else 0
  if needed > num_rows:
    lower_bound = math.ceil(int(lengths.sum()) / row_length)
    raise PackingError(
        f"{len(sequences)} texts with {int(lengths.sum())} tokens (longest {int(lengths.max())}) "
        f"need {needed} packed rows of {row_length} tokens (first-fit decreasing; at least "
        f"{lower_bound} by token count), but the packed shape has only {num_rows} rows: raise "
        f"the packing rows to >= {needed} (choose_num_rows picks them from the run's batches with "
        f"headroom), or the packing row length.")
  input_ids = np.full((num_rows, row_length), pad_token_id, dtype=np.int32)
  segment_ids = np.zeros((num_rows, row_length), dtype=np.int32)
  segment_positions = np.zeros((num_rows, row_length), dtype=np.int32)
  segment = np.zeros(len(sequences), dtype=np.int32)
  texts_in_row = np.zeros(num_rows, dtype=np.int32)
  # Segment ids in placement order: the order first_fit_decreasing filled each row in.
  for n in sorted(range(len(sequences)), key=lambda i: (row[i], offset[i])):
    r, start, end = row[n], offset[n], offset[n] + lengths[n]
    texts_in_row[r] += 1
    segment[n] = texts_in_row[r]
    input_ids[r, start:end] = sequences[n]
    segment_ids[r, start:end] = segment[n]
    segment_positions[r, start:end] = np.arange(lengths[n], dtype=np.int32)
  segment_index = np.stack([row, segment], axis=1).astype(np.int32).reshape(-1, 2)
  return PackedBatch(input_ids, segment_ids, segment_positions, segment_index,
                     offset.astype(np.int32), lengths)


@dataclasses.dataclass(frozen=True)
class RowsChoice:
  """The packed row count of a run and the sample it was chosen from (log `summary()`)."""
  num_rows: int  # R: ceil(max_needed * margin), rounded up to a multiple of `multiple_of`
  row_length: int  # L
  max_needed: int  # most rows FFD needed over the sampled batches
  mean_needed: float
  num_batches: int  # batches sampled
  margin: float
  multiple_of: int
  max_real_tokens: int  # most real tokens in one sampled batch

  def summary(self) -> str:
    return (f"packing: {self.num_rows} rows x {self.row_length} tokens per batch (FFD needed "
            f"{self.mean_needed:.1f} on average, at most {self.max_needed} over "
            f"{self.num_batches} sampled batches; margin {self.margin:g}, multiple of "
            f"{self.multiple_of}; at most {self.max_real_tokens} real tokens of "
            f"{self.num_rows * self.row_length})")


def choose_num_rows(batch_lengths: Iterable[Sequence[int]], row_length: int,
                    margin: float = 1.1, multiple_of: int = 1) -> RowsChoice:
  """The packed row count R for a run, from the text lengths of a sample of its batches.

  Args:
    batch_lengths: for each sampled batch, the token counts of all the texts it packs (queries,
      passages and negatives together), from the run's own plans: batch t is a pure function of
      (seed, t), so the sample is reproducible, and FFD takes ~0.5 ms a batch, so a run can pass
      all of its steps (then margin=1.0 cannot overflow). Sample generously otherwise: the tail
      matters (MLQA-R hybrid batches of 32 at 40/96 tokens, L=128: steps 0..199 needed at most
      18 rows, steps 200..2199 up to 20; benchmarks/packing.py).
    row_length: L.
    margin: headroom over the most rows any sampled batch needed, for unsampled batches with
      more or longer texts (>= 1). The rows a batch does not need are padding, so the margin is
      paid in compute on every step: 1.1 costs ~10%.
    multiple_of: R is rounded up to a multiple of this, e.g. the number of batch shards
      (sharding.num_batch_shards) so that rows split evenly over devices.
  """
  if margin < 1.0:
    raise PackingError(f"packing margin must be >= 1 (headroom over the sampled batches), "
                       f"found {margin}")
  if multiple_of < 1:
    raise PackingError(f"packing rows multiple_of must be >= 1, found {multiple_of}")
  needed, real = [], []
  for lengths in batch_lengths:
    needed.append(rows_needed(lengths, row_length))
    real.append(int(np.sum(lengths)))
  if not needed:
    raise PackingError("choose_num_rows needs at least one sampled batch")
  rows = max(1, math.ceil(max(needed) * margin - 1e-9))  # 1e-9: 10 * 1.1 is 11.000000000000002
  rows = -(-rows // multiple_of) * multiple_of
  return RowsChoice(num_rows=rows, row_length=row_length, max_needed=max(needed),
                    mean_needed=float(np.mean(needed)), num_batches=len(needed), margin=margin,
                    multiple_of=multiple_of, max_real_tokens=max(real))


# --- training batches: every tower's texts of a batch shard in that shard's own rows ------------
# Keys a packed batch adds (the padded *_input_ids / *_attention_mask stay on the host batch; the
# loss only ships these to the devices when data.packing is on, losses.LossConfig.packed):
#   packed_input_ids, packed_segment_ids, packed_segment_positions   [r, L] (r = rows on this host)
#   {tower}_segment_index                                             [b, 2] (row, segment id)
PACKED_ROW_KEYS = ("packed_input_ids", "packed_segment_ids", "packed_segment_positions")
TOWERS = ("query", "passage", "negative")  # the loss's towers, in its order (losses._TOWERS)


def segment_index_key(tower: str) -> str:
  return f"{tower}_segment_index"


@dataclasses.dataclass(frozen=True)
class PackingLayout:
  """How a run packs its batches (data.packing): ONE shared set of rows for all towers.

  The global batch of B rows is split into `num_shards` contiguous blocks (the batch shards of the
  mesh, as host_to_global lays them out); block s's query, passage and negative texts are packed
  into its own `rows_per_shard` rows, global rows [s * rows_per_shard, (s + 1) * rows_per_shard).
  So the packed rows split over the batch axes exactly like the batch rows do, and every
  `{tower}_segment_index` of a batch row points into rows on the same device: pooling is local.
  A shared set (not one per tower) because queries and passages then share rows and padding, and
  the encoder runs once.
  """
  num_shards: int  # S: batch shards (sharding.num_batch_shards)
  rows_per_shard: int  # R / S
  row_length: int  # L
  towers: tuple[str, ...]  # ("query", "passage"[, "negative"])
  choice: RowsChoice | None = None  # how rows_per_shard was chosen (None: data.packing_rows)

  @property
  def num_rows(self) -> int:
    """R: rows of the global batch."""
    return self.num_shards * self.rows_per_shard

  def summary(self) -> str:
    head = (f"packing: {self.num_rows} rows x {self.row_length} tokens per global batch "
            f"({self.rows_per_shard} per batch shard x {self.num_shards} shards; towers "
            f"{'+'.join(self.towers)} share them)")
    if self.choice is None:
      return head + "; rows from data.packing_rows"
    c = self.choice
    return (head + f"; chosen by first-fit decreasing over {c.num_batches} sampled shard batches: "
            f"{c.mean_needed:.1f} rows needed on average, at most {c.max_needed}, margin "
            f"{c.margin:g}")


def check_config(data_config) -> None:
  """data.packing_* fields (when data.packing is on): PackingError naming the fix."""
  if not data_config.get("packing", False):
    return
  row_length = int(data_config.packing_row_length)
  longest = max(int(data_config.query_max_length), int(data_config.passage_max_length))
  if row_length < longest:
    raise PackingError(
        f"data.packing_row_length={row_length} is shorter than the longest text a batch can "
        f"hold ({longest} tokens: data.query_max_length / data.passage_max_length); raise it to "
        f">= {longest}, e.g. 128.")
  if int(data_config.packing_rows) < 0:
    raise PackingError(f"data.packing_rows must be >= 0 (0 = chosen from the run's batches), "
                       f"found {data_config.packing_rows}")


def shard_lengths(tower_lengths: Sequence[np.ndarray], num_shards: int) -> list[np.ndarray]:
  """The lengths of the texts each of `num_shards` contiguous row blocks packs, from each tower's
  [B] text lengths (the order `pack_towers` packs them in)."""
  rows = len(tower_lengths[0])
  if rows % num_shards:
    raise PackingError(f"a batch of {rows} rows does not split into {num_shards} batch shards")
  per = rows // num_shards
  return [np.concatenate([np.asarray(l)[s * per:(s + 1) * per] for l in tower_lengths])
          for s in range(num_shards)]


def pack_towers(batch, layout: PackingLayout, first_shard: int = 0,
                num_shards: int | None = None, pad_token_id: int = 0) -> dict[str, np.ndarray]:
  """The packed arrays of a (host-local) padded batch: PACKED_ROW_KEYS [n * R/S, L] and each
  tower's segment index [b, 2], in global row numbers.

  Args:
    batch: the padded {tower}_input_ids / {tower}_attention_mask [b, *] of layout.towers.
    layout: the run's PackingLayout.
    first_shard: global index of this host's first batch shard (process_index * S / P).
    num_shards: batch shards in `batch` (S / P on each of P hosts; default layout.num_shards).
    pad_token_id: the tokenizer's, on padding.
  """
  num_shards = layout.num_shards if num_shards is None else num_shards
  towers = layout.towers
  sequences = {t: sequences_from_padded(batch[f"{t}_input_ids"], batch[f"{t}_attention_mask"])
               for t in towers}
  rows = len(sequences[towers[0]])
  if rows % num_shards:
    raise PackingError(f"a batch of {rows} rows does not split into {num_shards} batch shards")
  per = rows // num_shards
  parts = {k: [] for k in PACKED_ROW_KEYS}
  index = {t: np.zeros((rows, 2), np.int32) for t in towers}
  for s in range(num_shards):
    block = slice(s * per, (s + 1) * per)
    texts = [x for t in towers for x in sequences[t][block]]  # tower by tower, rows in order
    packed = pack(texts, layout.rows_per_shard, layout.row_length, pad_token_id)
    shard_index = packed.segment_index.copy()
    shard_index[:, 0] += (first_shard + s) * layout.rows_per_shard  # global row numbers
    for j, t in enumerate(towers):
      index[t][block] = shard_index[j * per:(j + 1) * per]
    parts["packed_input_ids"].append(packed.input_ids)
    parts["packed_segment_ids"].append(packed.segment_ids)
    parts["packed_segment_positions"].append(packed.segment_positions)
  out = {k: np.concatenate(v) for k, v in parts.items()}
  out.update({segment_index_key(t): index[t] for t in towers})
  return out
