"""Model sections of the experiment configs: one preset per backbone.

Field names follow Hugging Face `config.json` so that a preset, a checkpoint's config and the
encoder's `EncoderConfig` read the same. With `init_from` set, the architecture fields are taken
from the checkpoint and only `pooling`, `dtype` and the dropout rates here apply.
"""

import ml_collections

from hybrid_jax import errors

# Architecture of each backbone (from the public Hugging Face configs).
_ARCHITECTURES = {
    # XLM-R base: RoBERTa architecture, 250k SentencePiece vocabulary.
    "xlmr-base": dict(model_type="xlm-roberta", vocab_size=250002, hidden_size=768,
                      num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                      layer_norm_eps=1e-5, pooling="mean", add_pooling_layer=False),
    # XLM-R large: the same vocabulary, 24 layers, hidden 1024.
    "xlmr-large": dict(model_type="xlm-roberta", vocab_size=250002, hidden_size=1024,
                       num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                       layer_norm_eps=1e-5, pooling="mean", add_pooling_layer=False),
    # LaBSE: BERT architecture with the dense+tanh pooler, 501k vocabulary.
    "labse": dict(model_type="bert", vocab_size=501153, hidden_size=768, num_hidden_layers=12,
                  num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                  type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12, pooling="pooler",
                  add_pooling_layer=True),
    # multilingual-e5-small: BERT architecture over the XLM-R vocabulary, mean pooling; as the
    # offline conversion (models/e5_convert.py) has it: no pooler, pad id = the tokenizer's <pad>.
    "me5-small": dict(model_type="bert", vocab_size=250037, hidden_size=384, num_hidden_layers=12,
                      num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512,
                      type_vocab_size=2, pad_token_id=1, layer_norm_eps=1e-12, pooling="mean",
                      add_pooling_layer=False),
    # Tiny encoder for tests and :runlocal demos on the synthetic data (its own small vocabulary).
    "tiny": dict(model_type="bert", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                 type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12, pooling="mean",
                 add_pooling_layer=False),
}



# Input prefixes of each backbone (query, passage), part of the model: multilingual-e5 was trained
# with lower-case "query: " / "passage: " (its model card; capitalised ones cost it .06-.11 mAP on
# XQuAD-R). The others have no prefixes of their own and take the paper's E5-style ones.
PAPER_PREFIXES = ("Query: ", "Passage: ")
_INPUT_PREFIXES = {"me5-small": ("query: ", "passage: ")}


def input_prefixes(backbone: str) -> tuple[str, str]:
  """(query prefix, passage prefix) the backbone expects; config.data.*_prefix take these."""
  if backbone not in _ARCHITECTURES:
    raise PresetError(f"unknown backbone {backbone!r}; known: {sorted(_ARCHITECTURES)}")
  return _INPUT_PREFIXES.get(backbone, PAPER_PREFIXES)


class PresetError(errors.UserError):
  """An unknown backbone name."""


def model_config(backbone: str) -> ml_collections.ConfigDict:
  """The `config.model` section for one backbone (see _ARCHITECTURES for the names)."""
  if backbone not in _ARCHITECTURES:
    raise PresetError(f"unknown backbone {backbone!r}; known: {sorted(_ARCHITECTURES)}")
  config = ml_collections.ConfigDict()
  config.backbone = backbone  # preset name, for the record
  config.init_from = ""  # HF checkpoint dir ("" = random init); the configs set it
  config.tokenizer = ""  # dir with tokenizer.json ("" = init_from, or the data source's own)
  config.update(_ARCHITECTURES[backbone])
  config.hidden_act = "gelu"  # activation in the feed-forward blocks
  config.hidden_dropout_prob = 0.1  # dropout on embeddings and sublayer outputs (training only)
  config.attention_probs_dropout_prob = 0.1  # dropout on attention weights (training only)
  # Compute dtype: "auto" = bfloat16 on TPU/GPU, float32 on CPU (parameters are always float32).
  config.dtype = "auto"
  config.remat = False  # recompute each layer in the backward pass: less memory, ~1/3 more compute
  return config
