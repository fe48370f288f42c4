"""Token ids of a whole corpus, computed once and stored ragged for random access by (id, language).

A `TokenTable` holds one text field (queries, positives or negatives) of a `ParallelCorpus`: the
ids of cell (n, k) = example n in language k are `values[row_splits[c]:row_splits[c + 1]]` with
c = n * K + k; a missing cell is empty. Texts are truncated to `max_length` (special tokens kept)
at tokenisation, so a batch is a gather plus padding to exactly `max_length`.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from hybrid_jax.data import tokenization

_CHUNK = 50_000  # texts per tokenizer call; progress is reported between chunks


@dataclasses.dataclass(frozen=True)
class TokenTable:
  values: np.ndarray  # [T] int32, all token ids back to back
  row_splits: np.ndarray  # [N * K + 1] int64
  num_languages: int  # K
  max_length: int  # every cell has <= max_length ids
  pad_token_id: int
  num_truncated: int  # texts that were longer than max_length

  def cells(self, example: np.ndarray, lang: np.ndarray) -> np.ndarray:
    return np.asarray(example, np.int64) * self.num_languages + np.asarray(lang, np.int64)

  def lengths(self, example: np.ndarray, lang: np.ndarray) -> np.ndarray:
    cells = self.cells(example, lang)
    return (self.row_splits[cells + 1] - self.row_splits[cells]).astype(np.int32)

  def gather(self, example: np.ndarray, lang: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [b, max_length] int32, attention_mask [b, max_length] int32) of b cells."""
    cells = self.cells(example, lang)
    starts = self.row_splits[cells]
    lengths = self.row_splits[cells + 1] - starts  # [b]
    positions = np.arange(self.max_length)[None, :]
    mask = positions < lengths[:, None]  # [b, L]
    index = np.where(mask, starts[:, None] + positions, 0)
    input_ids = np.where(mask, self.values[index] if len(self.values) else 0, self.pad_token_id)
    return input_ids.astype(np.int32), mask.astype(np.int32)


def tokenize_field(tokenizer: tokenization.Tokenizer, texts: np.ndarray, prefix: str,
                   max_length: int, desc: str = "tokenizing") -> TokenTable:
  """Tokenizes the non-None cells of an [N, K] object array of texts (row-major)."""
  n, k = texts.shape
  flat = texts.reshape(-1)
  present = np.flatnonzero(np.not_equal(flat, None))
  strings = [flat[i] for i in present]
  pieces: list[np.ndarray] = []
  num_truncated = 0
  start = time.time()
  for begin in range(0, len(strings), _CHUNK):
    chunk = strings[begin:begin + _CHUNK]
    # One token of slack tells which texts the truncation cuts; only those are encoded again.
    ids = tokenizer.token_ids(chunk, max_length + 1, prefix)
    too_long = [i for i, x in enumerate(ids) if len(x) > max_length]
    if too_long:
      for i, x in zip(too_long, tokenizer.token_ids([chunk[i] for i in too_long], max_length, prefix)):
        ids[i] = x
    num_truncated += len(too_long)
    pieces.extend(ids)
    if len(strings) > _CHUNK:
      done = begin + len(chunk)
      elapsed = time.time() - start
      eta = elapsed / done * (len(strings) - done)
      print(f"{desc}: {done}/{len(strings)} texts, {elapsed:.0f}s elapsed, ETA {eta:.0f}s",
            file=sys.stderr, flush=True)
  lengths = np.zeros(n * k, dtype=np.int64)
  lengths[present] = [len(x) for x in pieces]
  row_splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  values = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
  return TokenTable(values, row_splits, k, max_length, tokenizer.pad_token_id, int(num_truncated))
