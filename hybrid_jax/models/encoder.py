"""Flax linen transformer encoder for the BERT and XLM-R/RoBERTa families, with pooling.

One module covers LaBSE and multilingual-e5 (BERT) and XLM-R (RoBERTa): the two differ only in how
position ids are formed (RoBERTa counts real tokens from `pad_token_id + 1`, BERT counts from 0),
in their token-type vocabulary and in whether the dense+tanh pooler exists. Both are post-LayerNorm.

The parameter tree mirrors Hugging Face's module names (`embeddings/word_embeddings`,
`encoder/layer_3/attention/self/query`, ...), so `hf_checkpoint.py` maps weights mechanically.
Parameters are float32 and carry logical axis names (`vocab`, `embed`, `mlp`, `qkv`, `position`,
`type`) through `nn.with_logical_partitioning`; the mesh rules in `sharding.py` map these to mesh
axes. Activations run in `config.dtype` (bfloat16 on accelerators); softmax, LayerNorm statistics,
pooling and normalisation run in float32 so that bf16 training stays stable.

Packed inputs (data/packing.py): several texts share a row of `[R, L]`, told apart by
`segment_ids` (0 = padding, 1..S = the row's texts). Attention is then block-diagonal (a token
sees only its own text), position ids restart at each text, and pooling is per text, so every
text's embedding equals the one it gets alone in a padded batch; only less padding is computed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax import errors

MODEL_TYPES = ("bert", "xlm-roberta", "roberta")
POOLINGS = ("cls", "mean", "pooler")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
# Fields shared by `EncoderConfig` and a Hugging Face `config.json`.
_HF_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
              "num_attention_heads", "intermediate_size", "max_position_embeddings",
              "type_vocab_size", "pad_token_id", "layer_norm_eps", "hidden_act",
              "hidden_dropout_prob", "attention_probs_dropout_prob")
_HF_ARCHITECTURES = {"bert": "BertModel", "xlm-roberta": "XLMRobertaModel",
                     "roberta": "RobertaModel"}
_NORM_EPS = 1e-12  # floor of the L2 norm, so an all-zero pooled vector does not divide by zero
_INIT_STD = 0.02  # BERT's initializer_range


class EncoderConfigError(errors.UserError):
  """An encoder configuration is inconsistent (bad sizes, unknown names)."""


def resolve_dtype(name: str) -> str:
  """"auto" (the presets' default) -> bfloat16 on TPU/GPU, float32 on CPU; others pass through."""
  if name == "auto":
    return "bfloat16" if jax.default_backend() in ("tpu", "gpu") else "float32"
  return name


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Architecture and numerics of the encoder; field names follow Hugging Face `config.json`."""
  model_type: str  # "bert" | "xlm-roberta" | "roberta"
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  pad_token_id: int
  layer_norm_eps: float
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  pooling: str = "mean"  # cls | mean | pooler (pooler = CLS -> dense -> tanh, BERT/LaBSE)
  add_pooling_layer: bool = False  # whether the pooler parameters exist (and are exported)
  dtype: str = "float32"  # compute dtype ("bfloat16" on accelerators); params always float32
  remat: bool = False  # rematerialise each layer in the backward pass (memory for compute)

  def __post_init__(self):
    problems = []
    if self.model_type not in MODEL_TYPES:
      problems.append(f"model_type {self.model_type!r} is not one of {list(MODEL_TYPES)}")
    if self.pooling not in POOLINGS:
      problems.append(f"pooling {self.pooling!r} is not one of {list(POOLINGS)}")
    if self.pooling == "pooler" and not self.add_pooling_layer:
      problems.append("pooling='pooler' needs add_pooling_layer=True (the dense+tanh pooler "
                      "weights); use pooling='cls' or 'mean' for models without a pooler")
    if self.dtype not in DTYPES:
      problems.append(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
    if self.hidden_act not in ACTIVATIONS:
      problems.append(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "type_vocab_size"):
      if int(getattr(self, name)) < 1:
        problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.num_attention_heads >= 1 and self.hidden_size % self.num_attention_heads:
      problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                      f"{self.num_attention_heads}")
    if self.is_roberta and self.max_position_embeddings <= self.pad_token_id + 1:
      problems.append(f"RoBERTa-style position ids start at pad_token_id + 1 = "
                      f"{self.pad_token_id + 1}, but max_position_embeddings is only "
                      f"{self.max_position_embeddings}")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      if not 0.0 <= float(getattr(self, name)) < 1.0:
        problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
    if problems:
      raise EncoderConfigError("Invalid encoder config: " + "; ".join(problems) + ".")

  # --- derived properties ---------------------------------------------------------------------
  @property
  def is_roberta(self) -> bool:
    """RoBERTa family: position ids count real tokens from pad_token_id + 1."""
    return self.model_type in ("xlm-roberta", "roberta")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def max_sequence_length(self) -> int:
    """Longest input the position table can encode (RoBERTa loses pad_token_id + 1 slots)."""
    if self.is_roberta:
      return self.max_position_embeddings - self.pad_token_id - 1
    return self.max_position_embeddings

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  # --- conversions ----------------------------------------------------------------------------
  def replace(self, **changes) -> "EncoderConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_model_config(cls, model_config: Mapping[str, Any]) -> "EncoderConfig":
    """From the `config.model` section of an experiment config (models/presets.py)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: model_config[k] for k in fields if k in model_config}
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.default is dataclasses.MISSING and f.name not in values)
    if missing:
      raise EncoderConfigError(
          f"config.model lacks the encoder fields {missing}. Start from a preset in "
          "hybrid_jax/models/presets.py, or set init_from to a Hugging Face directory.")
    if "dtype" in values:
      values["dtype"] = resolve_dtype(values["dtype"])
    return cls(**values)

  @classmethod
  def from_hf_config(cls, hf_config: Mapping[str, Any], **overrides) -> "EncoderConfig":
    """From a Hugging Face `config.json` dict; `overrides` set pooling, dtype, dropout, ..."""
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
      raise EncoderConfigError(
          f"config.json has model_type {model_type!r}; hybrid_jax supports {list(MODEL_TYPES)} "
          "(BERT, e.g. LaBSE and multilingual-e5, and XLM-R/RoBERTa).")
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise EncoderConfigError(
          f"config.json has position_embedding_type {position_type!r}; the encoder implements "
          "'absolute' position embeddings only (BERT, LaBSE, multilingual-e5, XLM-R).")
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
      raise EncoderConfigError("config.json describes a decoder (is_decoder / "
                               "add_cross_attention); the encoder implements encoders only.")
    missing = [k for k in _HF_FIELDS[:10] if k not in hf_config]
    if missing:
      raise EncoderConfigError(f"config.json lacks the fields {missing} needed to build the "
                               f"{model_type} encoder.")
    values = {k: hf_config[k] for k in _HF_FIELDS if k in hf_config}
    # Whether the pooler exists is not part of HF's config (it is a constructor argument); our
    # exports record it, and load_pretrained sets it from the weights present.
    values["add_pooling_layer"] = bool(hf_config.get("add_pooling_layer", False))
    values["pooling"] = (hf_config.get("hybrid_jax") or {}).get("pooling", "mean")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)

  def to_hf_config(self) -> dict:
    """A Hugging Face `config.json` dict; `transformers.AutoModel` builds the same model from it."""
    config = {k: getattr(self, k) for k in _HF_FIELDS}
    config["architectures"] = [_HF_ARCHITECTURES[self.model_type]]
    config["initializer_range"] = _INIT_STD
    config["position_embedding_type"] = "absolute"
    config["add_pooling_layer"] = self.add_pooling_layer
    if self.is_roberta:
      config.setdefault("bos_token_id", 0)
      config.setdefault("eos_token_id", 2)
    # Our own fields, kept so that load_pretrained restores the same pooling.
    config["hybrid_jax"] = {"pooling": self.pooling}
    return config


class EncoderOutput(NamedTuple):
  # Padded inputs: B = rows = texts. Packed inputs: last_hidden_state is per row [R, L, H] and
  # pooled / embedding are per text [N, H], in the order of `segment_index`.
  last_hidden_state: jax.Array  # [B, L, H] compute dtype
  pooled: jax.Array  # [B, H] float32, before L2 normalisation
  embedding: jax.Array  # [B, H] float32, L2-normalised (what retrieval uses)


def _dense(features: int, axes: tuple[str | None, str | None], config: EncoderConfig,
           name: str) -> nn.Dense:
  return nn.Dense(
      features, dtype=config.compute_dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def _layer_norm(config: EncoderConfig, name: str = "LayerNorm") -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps, dtype=config.compute_dtype, param_dtype=jnp.float32,
      name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


def position_ids(config: EncoderConfig, input_ids: jax.Array) -> jax.Array:
  """Position ids [B, L]: 0..L-1 for BERT; RoBERTa's padding-offset scheme otherwise.

  RoBERTa (transformers' `create_position_ids_from_input_ids`) numbers the non-pad tokens
  pad_token_id + 1, pad_token_id + 2, ... and gives pad tokens the id pad_token_id.
  """
  if config.is_roberta:
    not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id
  return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


def packed_position_ids(config: EncoderConfig, segment_ids: jax.Array,
                        segment_positions: jax.Array) -> jax.Array:
  """Position ids [R, L] of packed rows: each text numbered as if it were alone in its row.

  BERT: the position within the text. RoBERTa: pad_token_id + 1 + that position for real tokens
  and pad_token_id for padding, which is what `position_ids` gives the same text padded.
  """
  positions = segment_positions.astype(jnp.int32)
  if config.is_roberta:
    return jnp.where(segment_ids > 0, positions + config.pad_token_id + 1, config.pad_token_id)
  return positions


class Embeddings(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool, positions=None):
    """positions: [B, L] position ids; None = `position_ids(config, input_ids)` (padded rows)."""
    cfg = self.config

    def embed(num, axes, name):
      return nn.Embed(
          num, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=jnp.float32, name=name,
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), axes))

    x = embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
    if positions is None:
      positions = position_ids(cfg, input_ids)
    x += embed(cfg.max_position_embeddings, ("position", "embed"),
               "position_embeddings")(positions)
    x += embed(cfg.type_vocab_size, ("type", "embed"), "token_type_embeddings")(token_type_ids)
    x = _layer_norm(cfg)(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)  # [B, L, H]


class SelfAttention(nn.Module):
  """Multi-head self-attention; parameter names follow HF's `attention.self`."""
  config: EncoderConfig

  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool):
    cfg = self.config
    batch, length, _ = x.shape
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim

    def project(name):  # [B, L, H] -> [B, L, N, Dh]
      return _dense(cfg.hidden_size, ("embed", "qkv"), cfg, name)(x).reshape(
          batch, length, heads, head_dim)

    query, key, value = project("query"), project("key"), project("value")
    # Scores in the compute dtype, softmax in float32: bf16 exp/sum loses too much precision.
    scores = jnp.einsum("bqnd,bknd->bnqk", query, key) / jnp.sqrt(head_dim).astype(x.dtype)
    # mask_bias: [B, 1, 1, L] over keys (padded), [B, 1, L, L] block-diagonal (packed).
    scores = scores.astype(jnp.float32) + mask_bias
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    context = jnp.einsum("bnqk,bknd->bqnd", probs.astype(x.dtype), value)
    return context.reshape(batch, length, cfg.hidden_size)  # [B, L, H]


class SublayerOutput(nn.Module):
  """dense -> dropout -> residual -> LayerNorm (HF's `attention.output` and `output`)."""
  config: EncoderConfig
  in_axis: str

  @nn.compact
  def __call__(self, x, residual, deterministic: bool):
    cfg = self.config
    x = _dense(cfg.hidden_size, (self.in_axis, "embed"), cfg, "dense")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return _layer_norm(cfg)(x + residual)


class Attention(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool):
    context = SelfAttention(self.config, name="self")(x, mask_bias, deterministic)
    return SublayerOutput(self.config, "qkv", name="output")(context, x, deterministic)


class Intermediate(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    return ACTIVATIONS[cfg.hidden_act](
        _dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "dense")(x))


class EncoderLayer(nn.Module):
  """One post-LN transformer block: attention sublayer then feed-forward sublayer."""
  config: EncoderConfig

  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool):
    x = Attention(self.config, name="attention")(x, mask_bias, deterministic)
    hidden = Intermediate(self.config, name="intermediate")(x)
    return SublayerOutput(self.config, "mlp", name="output")(hidden, x, deterministic)


class LayerStack(nn.Module):
  """HF's `encoder`: the transformer blocks, named layer_{i} (HF: encoder.layer.{i})."""
  config: EncoderConfig

  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool):
    cfg = self.config
    # static_argnums counts `self` as 0: `deterministic` (a Python bool) is argument 3.
    layer_cls = nn.remat(EncoderLayer, static_argnums=(3,)) if cfg.remat else EncoderLayer
    for i in range(cfg.num_hidden_layers):
      x = layer_cls(cfg, name=f"layer_{i}")(x, mask_bias, deterministic)
    return x


class Pooler(nn.Module):
  """BERT pooler: the CLS hidden state through dense + tanh."""
  config: EncoderConfig

  @nn.compact
  def __call__(self, cls_hidden):
    cfg = self.config
    return jnp.tanh(_dense(cfg.hidden_size, ("embed", None), cfg, "dense")(cls_hidden))


class Encoder(nn.Module):
  """The full encoder: embeddings, `num_hidden_layers` blocks, pooling, L2 normalisation."""
  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               segment_ids=None, segment_positions=None, segment_index=None,
               deterministic: bool = True) -> EncoderOutput:
    """Encodes a padded batch, or a packed one when `segment_ids` is given.

    Args:
      input_ids: [B, L] int token ids (packed: [R, L], several texts per row).
      attention_mask: [B, L] 1 for real tokens, 0 for padding. Padded batches only: packed rows
        take their mask from segment_ids, so pass None with them.
      token_type_ids: [B, L] int segment ids, zeros when None. Padded batches only (packed texts
        use token type 0, as our single-text inputs always do).
      segment_ids: [R, L] int, packed rows: 0 on padding, 1..S for the row's texts.
      segment_positions: [R, L] int, packed rows: position of each token within its text (0 at
        the text's first token; any value on padding).
      segment_index: [N, 2] int, packed rows: (row, segment id) of each of the N texts; the
        outputs `pooled` and `embedding` are [N, H] in this order.
      deterministic: False enables dropout (rng collection "dropout").
    """
    cfg = self.config
    packed = _check_packed_inputs(input_ids, attention_mask, token_type_ids, segment_ids,
                                  segment_positions, segment_index)
    # Packed rows restart positions at every text (each text is truncated to the model's
    # max_length by the pipeline), so only a padded row's length is bounded by the table.
    if not packed and input_ids.shape[-1] > cfg.max_sequence_length:
      # Checked at trace time: past the position table, jnp's gather would silently clamp.
      raise EncoderConfigError(
          f"input length {input_ids.shape[-1]} exceeds the {cfg.max_sequence_length} positions "
          f"this {cfg.model_type} encoder has (max_position_embeddings="
          f"{cfg.max_position_embeddings}); truncate the inputs (max_length).")
    if packed:
      return self._encode_packed(input_ids, segment_ids, segment_positions, segment_index,
                                 deterministic)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = attention_mask.astype(jnp.bool_)
    # Additive mask over keys, float32 like the softmax: [B, 1, 1, L].
    mask_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]

    x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic)
    x = LayerStack(cfg, name="encoder")(x, mask_bias, deterministic)  # [B, L, H]

    pooler_output = None
    if cfg.add_pooling_layer:
      pooler_output = Pooler(cfg, name="pooler")(x[:, 0])
    pooled = pool(cfg.pooling, x, mask, pooler_output)
    return EncoderOutput(last_hidden_state=x, pooled=pooled, embedding=l2_normalize(pooled))

  def _encode_packed(self, input_ids, segment_ids, segment_positions, segment_index,
                     deterministic: bool) -> EncoderOutput:
    """Packed rows [R, L] -> per-text outputs [N, H]; the same submodules (and parameter names)
    as the padded path, called once each, so checkpoints are shared."""
    cfg = self.config
    segment_ids = segment_ids.astype(jnp.int32)
    # Block-diagonal additive mask [R, 1, L, L]: query i sees key j iff both are in the same
    # text. Padding (segment 0) sees padding, so that no softmax row is fully masked (its output
    # is never pooled and gets no gradient); real tokens never see padding or other texts.
    same_text = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask_bias = jnp.where(same_text, 0.0, jnp.finfo(jnp.float32).min)[:, None, :, :]
    positions = packed_position_ids(cfg, segment_ids, segment_positions)

    x = Embeddings(cfg, name="embeddings")(input_ids, jnp.zeros_like(input_ids), deterministic,
                                           positions=positions)
    x = LayerStack(cfg, name="encoder")(x, mask_bias, deterministic)  # [R, L, H]

    rows, segments = segment_index[:, 0], segment_index[:, 1]
    first = x[rows, _first_columns(segment_ids)[rows, segments]]  # [N, H] compute dtype
    pooler_output = None
    if cfg.add_pooling_layer:
      pooler_output = Pooler(cfg, name="pooler")(first)
    if cfg.pooling == "mean":
      pooled = _segment_means(x, segment_ids)[rows, segments]
    elif cfg.pooling == "cls":
      pooled = first.astype(jnp.float32)
    else:  # "pooler" (EncoderConfig checked that it exists)
      pooled = pooler_output.astype(jnp.float32)
    return EncoderOutput(last_hidden_state=x, pooled=pooled, embedding=l2_normalize(pooled))


def _check_packed_inputs(input_ids, attention_mask, token_type_ids, segment_ids,
                         segment_positions, segment_index) -> bool:
  """Whether the inputs are packed; a clear error (at trace time) for inconsistent ones."""
  given = {"segment_ids": segment_ids, "segment_positions": segment_positions,
           "segment_index": segment_index}
  if all(v is None for v in given.values()):
    if attention_mask is None:
      raise EncoderConfigError("Encoder needs attention_mask [B, L] for a padded batch (or "
                               "segment_ids, segment_positions and segment_index for packed rows).")
    return False
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise EncoderConfigError(f"packed inputs need segment_ids, segment_positions and "
                             f"segment_index together; missing {missing}.")
  problems = []
  if attention_mask is not None or token_type_ids is not None:
    problems.append("attention_mask and token_type_ids must be None with packed rows (the mask "
                    "comes from segment_ids, token types are 0)")
  for name in ("segment_ids", "segment_positions"):
    if tuple(given[name].shape) != tuple(input_ids.shape):
      problems.append(f"{name} has shape {tuple(given[name].shape)}, input_ids "
                      f"{tuple(input_ids.shape)}")
  if segment_index.ndim != 2 or segment_index.shape[1] != 2:
    problems.append(f"segment_index must be [N, 2] (row, segment id), found shape "
                    f"{tuple(segment_index.shape)}")
  if problems:
    raise EncoderConfigError("Invalid packed encoder inputs: " + "; ".join(problems) + ".")
  return True


def _first_columns(segment_ids) -> jax.Array:
  """[R, L + 1] int: the column of each segment's first token in its row (segment ids index the
  second axis; 0 is padding). An integer reduction, so that gathering the first token is exact."""
  length = segment_ids.shape[1]
  columns = jnp.arange(length, dtype=jnp.int32)
  return jax.vmap(lambda s: jax.ops.segment_min(columns, s, num_segments=length + 1))(segment_ids)


def _segment_means(hidden, segment_ids) -> jax.Array:
  """[R, L + 1, H] float32: the mean hidden state of each segment of each row (segment ids <= L).

  A per-row segment-sum (vmap keeps the row axis, so rows sharded over devices stay local) in
  float32, like `pool`'s padded mean."""
  length = segment_ids.shape[1]
  one_row = lambda values, s: jax.ops.segment_sum(values, s, num_segments=length + 1)
  totals = jax.vmap(one_row)(hidden.astype(jnp.float32), segment_ids)
  counts = jax.vmap(one_row)(jnp.ones(segment_ids.shape, jnp.float32), segment_ids)
  return totals / jnp.maximum(counts, 1.0)[..., None]


def pool(pooling: str, hidden, mask, pooler_output=None) -> jax.Array:
  """Pools hidden states [B, L, H] to [B, H] float32 (`mask`: [B, L] bool, real tokens)."""
  if pooling == "cls":
    return hidden[:, 0].astype(jnp.float32)
  if pooling == "pooler":
    return pooler_output.astype(jnp.float32)
  if pooling == "mean":
    weights = mask.astype(jnp.float32)[..., None]  # [B, L, 1]
    total = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  raise EncoderConfigError(f"unknown pooling {pooling!r}; expected one of {list(POOLINGS)}")


def l2_normalize(x: jax.Array) -> jax.Array:
  """Rows of x [B, H] scaled to unit L2 norm (zero rows stay zero)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, _NORM_EPS)


def _dummy_inputs():
  ids = jnp.zeros((1, 2), jnp.int32)
  return ids, jnp.ones_like(ids)


def _boxed_init(config: EncoderConfig, rng):
  return Encoder(config).init(rng, *_dummy_inputs())["params"]


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: EncoderConfig, rng) -> dict:
  """Randomly initialised float32 parameters (plain arrays, no partitioning boxes).

  Jitted: eager initialisation dispatches one op per tensor and is seconds slower on CPU. To
  initialise directly into a sharded layout, jit `Encoder(config).init` with out_shardings
  built from `logical_axes(config)` instead.
  """
  return nn.meta.unbox(_boxed_init(config, rng))


def logical_axes(config: EncoderConfig):
  """PartitionSpecs of logical axis names, with the same tree structure as `init_params`."""
  boxed = jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0)))
  return nn.get_partition_spec(boxed)
