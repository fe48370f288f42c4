"""Batch inference: texts -> L2-normalised embeddings, jit-compiled and sharded over devices.

Used by the evaluator (`python -m hybrid_jax.evaluate`), by `python -m hybrid_jax.embed` and by
anyone who wants vectors from a checkpoint:

    embedder = TextEmbedder.from_pretrained("/path/to/hf_dir", max_length=128)
    emb = embedder.embed(texts, prefix="query: ", desc="queries")   # [N, D] float32, input order

How: every text is tokenised once (Rust, batch-parallel); texts are sorted by length, longest
first, and cut into batches of `batch_size`; each batch is padded to the next length bucket
(16, 24, 32, 48, 64, 96, 128, ... up to max_length), so only a handful of shapes is ever compiled
and little compute goes to padding. The batch axis is sharded over every device of the mesh
(batch_size is rounded up to a multiple of the device count; the last, partial batch is padded
with empty rows), parameters are replicated. Rows are written back in input order.

`set_params` swaps in new parameters of the same model (periodic evaluation during training keeps
its embedders and their compiled shapes); `embed_fns` turns a query and a passage embedder into
the `embed_fn(texts, prefix)` pair the evaluators take.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hybrid_jax import errors
from hybrid_jax.data import tokenization
from hybrid_jax.models import encoder as encoder_lib

# Padded lengths: a geometric ladder (ratio <= 1.5) keeps padding waste below a third while the
# number of compiled shapes stays small.
_BUCKET_LADDER = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


class InferenceError(errors.UserError):
  """An embedder was asked for something it cannot do (bad sizes, no tokenizer, bad texts)."""


def bucket_lengths(max_length: int) -> tuple[int, ...]:
  """Padded lengths used for inputs of at most `max_length` tokens (max_length always included)."""
  return tuple(b for b in _BUCKET_LADDER if b < max_length) + (max_length,)


def _dtype_name(dtype) -> str:
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if name not in encoder_lib.DTYPES:
    raise InferenceError(f"dtype {dtype!r}: expected one of {list(encoder_lib.DTYPES)}")
  return name


class _Progress:
  """Texts done, rate and ETA on stderr, at most every `interval` seconds.

  Batches go longest first, so the ETA is estimated from padded tokens, not texts.
  """

  def __init__(self, desc: str | None, total_texts: int, total_tokens: int, interval: float = 10.0):
    self.desc, self.total_texts, self.total_tokens = desc, total_texts, max(total_tokens, 1)
    self.interval = interval
    self.start = self.last = time.time()
    self.texts = self.tokens = 0

  def update(self, texts: int, tokens: int) -> None:
    self.texts += texts
    self.tokens += tokens
    now = time.time()
    done = self.texts >= self.total_texts
    if self.desc is None or (now - self.last < self.interval and not done):
      return
    self.last = now
    elapsed = now - self.start
    eta = elapsed / max(self.tokens, 1) * (self.total_tokens - self.tokens)
    print(f"{self.desc}: {self.texts}/{self.total_texts} texts, "
          f"{self.texts / max(elapsed, 1e-9):.1f} texts/s, elapsed {elapsed:.0f}s, "
          f"ETA {eta:.0f}s", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=16)
def _encode_function(config: encoder_lib.EncoderConfig, mesh: Mesh):
  """The jit'd encoder of one (config, mesh), shared by every embedder using them.

  Sharing the function shares its compilation cache: the query and passage embedders of an
  evaluation (same model, different max_length) compile each (rows, length) shape once.
  """
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(mesh.axis_names))  # batch axis over every device
  model = encoder_lib.Encoder(config)

  def encode(params, input_ids, attention_mask):  # [B, L] int32 x2 -> [B, D] float32, unit norm
    return model.apply({"params": params}, input_ids, attention_mask, deterministic=True).embedding

  fn = jax.jit(encode, in_shardings=(replicated, batch_sharding, batch_sharding),
               out_shardings=batch_sharding)
  return fn, replicated, batch_sharding


class TextEmbedder:
  """Embeds texts with an encoder: jit'd, length-bucketed, sharded over the mesh's devices."""

  def __init__(self, config: encoder_lib.EncoderConfig, params, tokenizer: tokenization.Tokenizer,
               *, batch_size: int = 128, max_length: int = 128, dtype=jnp.float32,
               mesh: Mesh | None = None):
    """
    Args:
      config: the encoder's architecture (its pooling is used; dtype is replaced by `dtype`).
      params: float32 parameter pytree (NumPy or jax arrays) of `config`.
      tokenizer: the model's tokenizer.
      batch_size: texts per compiled batch over all devices (rounded up to a multiple of the
        device count).
      max_length: truncation length in tokens, special tokens included.
      dtype: compute dtype (jnp.float32, or jnp.bfloat16 on accelerators); output is float32.
      mesh: devices to shard batches over (every axis of the mesh); default all local devices.
    """
    if tokenizer is None:
      raise InferenceError("TextEmbedder needs the model's tokenizer (tokenizer.json in the "
                           "model directory); got None.")
    if int(batch_size) < 1:
      raise InferenceError(f"batch_size must be >= 1, got {batch_size}")
    if int(max_length) < 2:
      raise InferenceError(f"max_length must be >= 2 (room for the special tokens), got "
                           f"{max_length}")
    if int(max_length) > config.max_sequence_length:
      raise InferenceError(
          f"max_length {max_length} exceeds what the model's position table holds "
          f"({config.max_sequence_length} tokens, max_position_embeddings="
          f"{config.max_position_embeddings}); pass max_length <= {config.max_sequence_length}.")
    tokenizer.check_fits_embeddings(config.vocab_size)
    self.config = config.replace(dtype=_dtype_name(dtype))
    self.tokenizer = tokenizer
    self.max_length = int(max_length)
    self.mesh = mesh if mesh is not None else Mesh(np.array(jax.local_devices()), ("data",))
    num_devices = self.mesh.devices.size
    self.num_devices = num_devices
    self.batch_size = -(-int(batch_size) // num_devices) * num_devices
    self.buckets = bucket_lengths(self.max_length)
    self.compiled_shapes: set[tuple[int, int]] = set()  # (rows, length) of the batches run

    self._encode, self._replicated, self._batch_sharding = _encode_function(self.config,
                                                                             self.mesh)
    self.params = None
    self.set_params(params)

  def set_params(self, params) -> None:
    """Encodes with new parameters of the same architecture from now on (e.g. the trainer's
    current ones), replicated on this embedder's mesh; every compiled shape is kept."""
    if self.params is not None:
      old_shapes = jax.tree.map(np.shape, self.params)
      new_shapes = jax.tree.map(np.shape, params)
      if jax.tree.structure(old_shapes) != jax.tree.structure(new_shapes) or (
          jax.tree.leaves(old_shapes) != jax.tree.leaves(new_shapes)):
        raise InferenceError("set_params: the new parameters do not have the tree structure and "
                             "shapes of this embedder's model; build a new TextEmbedder for "
                             "another architecture.")
    self.params = jax.device_put(params, self._replicated)

  # --- construction ----------------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, model_dir: str, *, pooling: str | None = None, batch_size: int = 128,
                      max_length: int = 128, dtype=jnp.float32, mesh: Mesh | None = None
                      ) -> "TextEmbedder":
    """From a Hugging Face model directory (config.json, weights, tokenizer.json)."""
    from hybrid_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top

    loaded = hf_checkpoint.load_pretrained(model_dir, pooling=pooling, dtype=_dtype_name(dtype))
    if loaded.tokenizer is None:
      raise InferenceError(
          f"{model_dir!r} has no tokenizer.json; the embedder needs the model's tokenizer. Save "
          "it next to the weights (transformers: AutoTokenizer.from_pretrained(SRC)"
          ".save_pretrained(DIR)).")
    return cls(loaded.config, loaded.params, loaded.tokenizer, batch_size=batch_size,
               max_length=max_length, dtype=dtype, mesh=mesh)

  @classmethod
  def from_params(cls, loaded, *, batch_size: int = 128, max_length: int = 128, dtype=jnp.float32,
                  mesh: Mesh | None = None) -> "TextEmbedder":
    """From a training checkpoint (`checkpointing.load_params(...)`: .config, .params, .tokenizer)."""
    return cls(loaded.config, loaded.params, loaded.tokenizer, batch_size=batch_size,
               max_length=max_length, dtype=dtype, mesh=mesh)

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  # --- embedding ---------------------------------------------------------------------------------
  def _bucket(self, length: int) -> int:
    return next(b for b in self.buckets if b >= length)

  def embed(self, texts: Sequence[str], prefix: str = "", desc: str | None = None) -> np.ndarray:
    """Embeddings [N, D] float32, L2-normalised, row i for texts[i].

    Args:
      texts: N strings (empty strings are fine: they embed their special tokens).
      prefix: prepended to every text before tokenisation (e5: "query: " / "passage: ").
      desc: when given, progress and ETA are printed to stderr under this label.
    """
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
      raise InferenceError(f"texts must be strings; item {bad[0]} is "
                           f"{type(texts[bad[0]]).__name__} ({texts[bad[0]]!r})")
    out = np.zeros((len(texts), self.dim), np.float32)
    if not texts:
      return out
    ids = self.tokenizer.token_ids(texts, self.max_length, prefix)
    lengths = np.array([len(x) for x in ids], np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first: the slowest shapes compile first
    plan = []  # (text indices, rows, padded length)
    for start in range(0, len(texts), self.batch_size):
      index = order[start:start + self.batch_size]
      rows = -(-len(index) // self.num_devices) * self.num_devices
      plan.append((index, rows, self._bucket(int(lengths[index[0]]))))
    progress = _Progress(desc, len(texts), sum(rows * length for _, rows, length in plan))

    pending = None  # the previous batch: fetched after the next one is dispatched (overlap)
    for index, rows, length in plan:
      input_ids = np.full((rows, length), self.tokenizer.pad_token_id, np.int32)
      mask = np.zeros((rows, length), np.int32)  # padding rows stay all-zero and are dropped
      for row, i in enumerate(index):
        input_ids[row, :lengths[i]] = ids[i]
        mask[row, :lengths[i]] = 1
      self.compiled_shapes.add((rows, length))
      embedding = self._encode(self.params, jax.device_put(input_ids, self._batch_sharding),
                               jax.device_put(mask, self._batch_sharding))
      if pending is not None:
        self._collect(out, progress, *pending)
      pending = (index, rows * length, embedding)
    self._collect(out, progress, *pending)
    return out

  @staticmethod
  def _collect(out: np.ndarray, progress: _Progress, index: np.ndarray, tokens: int,
               embedding: jax.Array) -> None:
    out[index] = np.asarray(embedding)[:len(index)]  # [rows, D] -> the real rows, input order
    progress.update(len(index), tokens)


EmbedFn = Callable[[Sequence[str], str], np.ndarray]


def embed_fns(query_embedder: TextEmbedder, passage_embedder: TextEmbedder | None = None, *,
              show_progress: bool = False) -> tuple[EmbedFn, EmbedFn]:
  """(embed_queries, embed_passages): the evaluators' `embed_fn(texts, prefix)` pair over two
  embedders (the passage one usually with a longer max_length; default: the query one).

  With `show_progress`, each prints progress and ETA on stderr as "embedding queries" /
  "embedding candidates"."""
  passage_embedder = passage_embedder or query_embedder

  def embed_queries(texts: Sequence[str], prefix: str) -> np.ndarray:
    return query_embedder.embed(texts, prefix=prefix,
                                desc="embedding queries" if show_progress else None)

  def embed_passages(texts: Sequence[str], prefix: str) -> np.ndarray:
    return passage_embedder.embed(texts, prefix=prefix,
                                  desc="embedding candidates" if show_progress else None)

  return embed_queries, embed_passages
