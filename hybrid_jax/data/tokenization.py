"""Tokenization with Hugging Face `tokenizers`: one wrapper used by training, evaluation and embed.

A model directory holds `tokenizer.json` (the fast-tokenizer file every HF model ships) and usually
`tokenizer_config.json` (which names the padding token). Texts are tokenized once, up front, in
Rust (batch-parallel); padding to a fixed or bucketed length happens here in NumPy so that the
arrays fed to jit have few distinct shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np
import tokenizers

from hybrid_jax import errors

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_PAD_TOKEN_CANDIDATES = ("<pad>", "[PAD]")


class TokenizerError(errors.UserError):
  """A tokenizer file is missing, unreadable or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class TokenizedBatch:
  input_ids: np.ndarray  # [N, L] int32, padded with the tokenizer's pad id
  attention_mask: np.ndarray  # [N, L] int32, 1 for real tokens
  lengths: np.ndarray  # [N] int32, number of real tokens (special tokens included)


class Tokenizer:
  """A `tokenizers.Tokenizer` with its padding token and fixed-shape batch encoding."""

  def __init__(self, hf_tokenizer: tokenizers.Tokenizer, pad_token_id: int, source: str = "<memory>"):
    # Work on a private copy: truncation settings are mutable state of the Rust object.
    self._tokenizer = tokenizers.Tokenizer.from_str(hf_tokenizer.to_str())
    self._tokenizer.no_padding()
    self._tokenizer.no_truncation()
    self.pad_token_id = int(pad_token_id)
    self.source = source

  # --- construction --------------------------------------------------------------------------
  @classmethod
  def from_dir(cls, model_dir: str) -> "Tokenizer":
    """Loads `tokenizer.json` (and the pad token from `tokenizer_config.json`) from a directory."""
    path = os.path.join(model_dir, TOKENIZER_FILE)
    if not os.path.isdir(model_dir):
      raise TokenizerError(
          f"Tokenizer directory {model_dir!r} does not exist. Expected a Hugging Face model "
          f"directory holding {TOKENIZER_FILE}.")
    if not os.path.isfile(path):
      raise TokenizerError(
          f"No {TOKENIZER_FILE} in {model_dir!r} (found: {sorted(os.listdir(model_dir))}). "
          "hybrid_jax needs the fast-tokenizer file; create it in Python with "
          "transformers.AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR).")
    pad_token = None
    config_path = os.path.join(model_dir, TOKENIZER_CONFIG_FILE)
    if os.path.isfile(config_path):
      try:
        with open(config_path, encoding="utf-8") as f:
          pad_token = json.load(f).get("pad_token")
      except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"Cannot read {config_path}: {e}") from e
      if isinstance(pad_token, dict):  # older transformers write AddedToken dicts
        pad_token = pad_token.get("content")
    return cls.from_file(path, pad_token=pad_token)

  @classmethod
  def from_file(cls, tokenizer_json: str, pad_token: str | None = None) -> "Tokenizer":
    try:
      hf_tokenizer = tokenizers.Tokenizer.from_file(tokenizer_json)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
      raise TokenizerError(
          f"Cannot parse {tokenizer_json} as a Hugging Face tokenizer.json: {e}") from e
    candidates = ((pad_token,) if pad_token else ()) + _PAD_TOKEN_CANDIDATES
    for token in candidates:
      token_id = hf_tokenizer.token_to_id(token)
      if token_id is not None:
        return cls(hf_tokenizer, token_id, source=tokenizer_json)
    raise TokenizerError(
        f"{tokenizer_json} has no padding token (looked for {list(candidates)}). Set 'pad_token' "
        f"in {TOKENIZER_CONFIG_FILE} next to it.")

  def save(self, out_dir: str) -> None:
    """Writes tokenizer.json and a minimal tokenizer_config.json naming the pad token."""
    os.makedirs(out_dir, exist_ok=True)
    self._tokenizer.save(os.path.join(out_dir, TOKENIZER_FILE))
    config_path = os.path.join(out_dir, TOKENIZER_CONFIG_FILE)
    config = {}
    if os.path.isfile(config_path):
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["pad_token"] = self.id_to_token(self.pad_token_id)
    with open(config_path, "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)

  # --- properties ----------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    """Number of token ids the tokenizer can emit (added tokens included)."""
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def hf_tokenizer(self) -> tokenizers.Tokenizer:
    return self._tokenizer

  def id_to_token(self, token_id: int) -> str | None:
    return self._tokenizer.id_to_token(token_id)

  def check_fits_embeddings(self, num_embeddings: int, model_name: str = "the model") -> None:
    """Fails if the tokenizer can emit ids past the embedding table (a silent NaN/garbage source)."""
    max_id = max(self._tokenizer.get_vocab(with_added_tokens=True).values())
    if max_id >= num_embeddings:
      raise TokenizerError(
          f"Tokenizer {self.source} emits token ids up to {max_id} but {model_name} has only "
          f"{num_embeddings} rows in its word-embedding table. The tokenizer and the checkpoint do "
          "not belong together: pass the tokenizer saved with this checkpoint.")

  # --- encoding ------------------------------------------------------------------------------
  def token_ids(self, texts: Sequence[str], max_length: int, prefix: str = "") -> list[np.ndarray]:
    """Token ids per text (special tokens added, truncated to max_length), unpadded."""
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 (room for special tokens), got {max_length}")
    self._tokenizer.enable_truncation(max_length)
    try:
      encodings = self._tokenizer.encode_batch([prefix + t for t in texts])
    finally:
      self._tokenizer.no_truncation()
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def pad(self, ids: Sequence[np.ndarray], length: int | None = None,
          pad_to_multiple_of: int = 1) -> TokenizedBatch:
    """Pads variable-length id arrays to `length` (or the longest, rounded up to a multiple)."""
    lengths = np.asarray([len(x) for x in ids], dtype=np.int32)
    if length is None:
      longest = int(lengths.max()) if len(ids) else 1
      length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    if len(ids) and lengths.max() > length:
      raise ValueError(f"a sequence of {lengths.max()} tokens does not fit padded length {length}")
    input_ids = np.full((len(ids), length), self.pad_token_id, dtype=np.int32)
    for row, x in enumerate(ids):
      input_ids[row, :len(x)] = x
    attention_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return TokenizedBatch(input_ids, attention_mask, lengths)

  def encode(self, texts: Sequence[str], max_length: int, prefix: str = "",
             pad_to_max_length: bool = True, pad_to_multiple_of: int = 1) -> TokenizedBatch:
    """Tokenizes, truncates and pads a list of texts.

    Args:
      texts: N strings.
      max_length: truncation length, special tokens included.
      prefix: prepended to every text (E5-style "Query: " / "Passage: ").
      pad_to_max_length: pad to exactly max_length (fixed shapes for training); otherwise pad to
        the longest text rounded up to `pad_to_multiple_of` (length buckets for inference).
    """
    ids = self.token_ids(texts, max_length, prefix)
    return self.pad(ids, max_length if pad_to_max_length else None, pad_to_multiple_of)
