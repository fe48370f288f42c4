"""Contrastive losses of the dual encoder: InfoNCE over the GLOBAL batch, plain or GradCache.

The loss (../shared/PAPER.md, "Loss") for query i with positive d+_i:

    l_i = -log( e^{t s(q_i, d+_i)} / ( e^{t s(q_i, d+_i)} + sum_{c in C_i} e^{t s(q_i, c)} ) )

s is the cosine (embeddings are L2-normalised by the encoder), t = 1 / temperature the scale, and
C_i the negatives of row i, chosen by `LossConfig`:
  in_batch_negatives  the other rows' positives d+_j (j != i): the standard in-batch negatives;
  hard_negatives      every row's hard negative d-_j (j in B), shared across the batch as in the
                      paper's formula;
  mask_same_id        a positive d+_j whose question id equals row i's is dropped from C_i: in an
                      X-Y or mixed batch the same passage can appear in several languages and must
                      not be pushed away. Row i's own positive always stays.
  mask_false_negatives  every candidate that IS one of row i's positives is dropped from C_i,
                      whatever row or slot it came from: an in-batch positive d+_j or a hard
                      negative d-_j (j = i included) whose passage id (data/passage_ids.py: one id
                      per passage, shared by identical texts and by equal names) is among the ids
                      of row i's record's positives in all languages (relevant_passage_ids).
                      Catches what mask_same_id cannot: a neighbouring-sentence hard negative that
                      is another row's gold sentence, and two question ids sharing one gold
                      sentence (masked in that sentence's language only: elsewhere the other
                      question's gold sentence is a true negative). Not symmetric: the
                      passage -> query term drops query j for d+_i when d+_i is relevant to j.
  symmetric           adds the passage -> query term (d+_i against all queries, same masking) and
                      averages the two directions.
The batch loss is the MEAN of l_i over the B rows (the paper writes a sum; the mean keeps the
learning rate independent of the batch size). The loss reads GLOBAL [B, D] arrays under jit, so with
the batch sharded over devices and hosts the negatives span all of them; XLA inserts the gathers.

Temperature: fixed (scale 1 / temperature, paper default 1 / 0.05) or learnable, CLIP-style, as a
trainable `log_scale` scalar in `params["log_scale"]` (scale = exp(log_scale), clipped at
MAX_SCALE so the logits cannot run away).

Two ways to get the loss and its gradients, equal up to float rounding (tested to <= 1e-5):

Plain (`value_and_grad`, chunk_size 0): encode all rows, loss, back-propagate through everything.
  Memory: the activations of every layer for all R = B * (2 or 3) sequences stay alive for the
  backward pass, O(R * L * H * layers) (times ~10-20 tensors per layer), plus the [B, R] logits.

GradCache (`gradcache_value_and_grad`, chunk_size C > 0; Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup"):
  1. Embed every row in chunks of C rows (`lax.map`), forward only: each chunk's activations die
     with the chunk. Keeps only the embeddings: O(R * D).
  2. Loss and its gradient with respect to the embeddings (and log_scale) on the full batch:
     O(B * R) logits and their gradient, O(R * D) embedding gradients (the "cache").
  3. Re-encode chunk by chunk (`lax.scan`) under `jax.vjp`, feed the cached embedding gradient of
     the chunk into the VJP and add the parameter gradient to a running sum.
  Peak memory: params + optimizer state (as always) + one parameter-sized gradient accumulator +
  O(C * L * H * layers) activations of ONE chunk + O(R * D + B * R) embeddings and logits. Only
  the last term grows with the batch, and it is tiny next to activations (D floats per sequence
  instead of L * H * layers * ~15). Compute: one extra forward pass (~4/3 of the plain FLOPs).
  Dropout: each chunk uses the same dropout key in steps 1 and 3, so the re-encoding reproduces
  the embeddings exactly; the keys differ from the plain path's, so with dropout on the two paths
  agree in distribution, and bitwise only when deterministic.
  Chunks are strided (chunk k holds rows k, k + B/C, k + 2B/C, ...), so that with the batch sharded
  over devices in contiguous blocks every chunk is spread evenly over all devices (C a multiple of
  the number of data shards keeps all devices busy in every chunk).

Batch features each loss needs (fail fast, before compiling, via `check_batch`):
  query_input_ids, query_attention_mask, passage_input_ids, passage_attention_mask   always
  negative_input_ids, negative_attention_mask                                          hard_negatives
  question_id                                                                          mask_same_id
  passage_id, relevant_passage_ids (+ negative_passage_id)                        mask_false_negatives
  batch_type                                                                           always (metrics)
With packed rows (data.packing, LossConfig.packed) the tower arrays are replaced by
  packed_input_ids, packed_segment_ids, packed_segment_positions  [R, L]  one set for all towers
  query_segment_index, passage_segment_index (+ negative_segment_index)  [B, 2] (row, segment)
(data/packing.py pack_towers): one encoder call gives every tower's [B, D] embeddings, equal to the
padded ones up to float rounding, so the loss and its masks are unchanged.

GradCache with packed rows (`_packed_gradcache_value_and_grad`): chunk_size C counts PACKED ROWS
(train.gradcache_chunk_size with data.packing), not batch rows: the R rows go in R / C chunks of C
rows, strided like `to_chunks` (chunk k holds rows k, k + R/C, ...), so that with the rows sharded
over the batch axes in contiguous blocks every chunk spans all devices; C must divide R (checked
when the step is traced, where the global R is known: LossConfigError). A text lies in the chunk
of its row (row r: chunk r % (R/C), position r // (R/C)), but a chunk's texts vary in number, so
the shapes stay static by encoding every chunk with ALL N = B * towers texts' segment index: the
chunk's own texts point to (position in chunk, segment), the others to a dummy segment of the
chunk (a padding segment, or the first text of row 0 when the chunk has no padding: never an
empty segment, whose zero embedding would make the L2-normalisation's VJP NaN). Pass 1 keeps
each text's embedding from its own chunk ([N, D]: jnp.where, exact); pass 3 feeds each chunk the
cached gradients of its own texts and zeros for the others, so the dummies contribute exactly
nothing. The only extra work is pooling N instead of ~N / (R/C) texts per chunk. Every chunk uses
one dropout key, fold_in(fold_in(rng, 0), chunk), in passes 1 and 3 (tower 0: all towers share
the rows, as in the plain packed loss), so the re-encoding reproduces the embeddings exactly.
Deterministic, the loss and gradients equal the plain packed step's (tested <= 1e-5 on 1 and 8
devices; tests/test_gradcache_packing.py). Memory as above with C packed rows in place of C batch
rows (C rows hold several texts each) plus O(N * D) per chunk.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from hybrid_jax import errors
from hybrid_jax.data import packing

# Row batch types: per-type loss sums are indexed by the batch_type ids the sampler writes, so the
# names come from their one owner (a leaf module: no data pipeline is imported here).
from hybrid_jax.data.row_types import ROW_TYPE_NAMES as BATCH_TYPE_NAMES
MAX_SCALE = 100.0  # learnable temperature: the scale is clipped here (CLIP's choice)

# (params["encoder"], input_ids [N, L], attention_mask [N, L], dropout key or None) -> [N, D].
# A packed loss (LossConfig.packed) calls it as (params, input_ids [R, L], None, key,
# segment_ids=, segment_positions=, segment_index= [N, 2]) -> [N, D] (train_step.make_encode_fn).
EncodeFn = Callable[..., jax.Array]


# What train.mask_false_negatives drops, named so that a run's config.json says which definition
# its numbers used: "per_question" = the row's own question's gold passages in every language
# (relevant_passage_ids). Protocol v1's earliest runs used "merged_questions" (question ids that
# share a gold sentence merged into one relevant set), since replaced: it also masked legitimate
# negatives (~58% of the masked pairs on XQuAD-R).
FALSE_NEGATIVE_MASK_DEFINITION = "per_question"


class LossConfigError(errors.UserError):
  """The loss options contradict each other or the batch lacks a feature the loss needs."""


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which negatives, masks and terms the InfoNCE loss uses (fields of config.train)."""

  temperature: float = 0.05  # scale = 1 / temperature (initial value when learnable)
  learnable_temperature: bool = False  # train log(scale) as params["log_scale"]
  in_batch_negatives: bool = True  # other rows' positives are negatives
  hard_negatives: bool = False  # every row's hard negative is a negative of every query
  symmetric: bool = False  # add the passage -> query term
  mask_same_id: bool = True  # rows sharing a question id are never negatives of each other
  chunk_size: int = 0  # > 0: GradCache with chunks of this many rows (packed rows when packed)
  # Off here, for embedding-level use without passage ids; config.train turns it on by default.
  mask_false_negatives: bool = False  # candidates that are the row's own positive passage dropped
  packed: bool = False  # towers come as packed rows (data.packing), not padded arrays

  @classmethod
  def from_train_config(cls, train_config, hard_negatives: bool = False,
                        packed: bool = False) -> "LossConfig":
    """From config.train (and config.data.hard_negatives / data.packing, which decide the batch
    features)."""
    definition = train_config.get("false_negative_mask_definition", FALSE_NEGATIVE_MASK_DEFINITION)
    if definition != FALSE_NEGATIVE_MASK_DEFINITION:
      raise LossConfigError(
          f"train.false_negative_mask_definition={definition!r}; this version implements "
          f"{FALSE_NEGATIVE_MASK_DEFINITION!r} only (a candidate is dropped for row i when it is "
          "one of the gold passages of row i's own question, in any language). Remove the "
          "override, or use the hybrid_jax version that wrote the config.")
    return cls(temperature=float(train_config.temperature),
               learnable_temperature=bool(train_config.learnable_temperature),
               in_batch_negatives=bool(train_config.get("in_batch_negatives", True)),
               hard_negatives=bool(hard_negatives),
               symmetric=bool(train_config.symmetric_loss),
               mask_same_id=bool(train_config.mask_same_id),
               chunk_size=int(train_config.gradcache_chunk_size),
               mask_false_negatives=bool(train_config.get("mask_false_negatives", True)),
               packed=bool(packed))

  def validate(self) -> None:
    if not self.temperature > 0:
      raise LossConfigError(f"train.temperature must be > 0 (scale = 1 / temperature), found "
                            f"{self.temperature}")
    if not (self.in_batch_negatives or self.hard_negatives):
      raise LossConfigError(
          "the loss has no negatives: train.in_batch_negatives is False and data.hard_negatives is "
          "False. Enable at least one of them.")
    if self.chunk_size < 0:
      raise LossConfigError(f"train.gradcache_chunk_size must be >= 0 (0 = plain loss), found "
                            f"{self.chunk_size}")
    # With packing, chunk_size counts packed rows; that it divides the global rows R is checked by
    # `check_packed_chunks` when the step is traced (R may be chosen from the run's batches).

  def required_features(self) -> tuple[str, ...]:
    if self.packed:
      features = [*packing.PACKED_ROW_KEYS, *map(packing.segment_index_key, self.tower_names()),
                  "batch_type"]
    else:
      features = ["query_input_ids", "query_attention_mask", "passage_input_ids",
                  "passage_attention_mask", "batch_type"]
      if self.hard_negatives:
        features += ["negative_input_ids", "negative_attention_mask"]
    if self.mask_same_id:
      features.append("question_id")
    if self.mask_false_negatives:
      features += ["passage_id", "relevant_passage_ids"]
      if self.hard_negatives:
        features.append("negative_passage_id")
    return tuple(features)

  def check_batch(self, batch: Mapping[str, Any]) -> None:
    """Raises LossConfigError naming every feature the loss needs that `batch` lacks."""
    missing = [k for k in self.required_features() if k not in batch]
    if missing:
      reasons = []
      if any(k.startswith("packed_") or k.endswith("_segment_index") for k in missing):
        reasons.append("a packed loss (data.packing=True) needs packed_* rows and *_segment_index "
                       "(TrainingData.train_batches(..., packing_layout=...) adds them)")
      if any(k.startswith("negative_") for k in missing):
        reasons.append("hard_negatives=True needs negative_* arrays (set data.hard_negatives=True "
                       "so the pipeline produces them)")
      if "question_id" in missing:
        reasons.append("mask_same_id=True needs question_id (or set train.mask_same_id=False)")
      if any("passage_id" in k for k in missing):
        reasons.append("mask_false_negatives=True needs passage_id / relevant_passage_ids / "
                       "negative_passage_id (the data pipeline writes them; or set "
                       "train.mask_false_negatives=False)")
      raise LossConfigError(
          f"the batch lacks feature(s) {missing} needed by the loss; it has {sorted(batch)}. "
          + "; ".join(reasons))
    if self.chunk_size and not self.packed:  # packed: check_packed_chunks (the GLOBAL rows)
      rows = batch["query_input_ids"].shape[0]
      if rows % self.chunk_size:
        raise LossConfigError(
            f"train.gradcache_chunk_size={self.chunk_size} does not divide the global batch of "
            f"{rows} rows; choose a divisor of the batch size (or 0 for the plain loss).")

  def check_packed_chunks(self, num_rows: int) -> None:
    """GradCache on packed rows: chunk_size (packed rows per chunk) must divide the R packed rows
    of the global batch; LossConfigError naming both and the fix otherwise."""
    c = self.chunk_size
    if c and num_rows % c:
      raise LossConfigError(
          f"train.gradcache_chunk_size={c} does not divide the {num_rows} packed rows of the "
          f"global batch (with data.packing=True the GradCache chunk counts packed rows, not batch "
          f"rows): set data.packing_rows to a multiple of {c} (e.g. {-(-num_rows // c) * c}), or "
          f"choose a gradcache_chunk_size that divides {num_rows} (the number of batch shards "
          f"always does, and multiples of it keep every device busy), or 0 for the plain loss.")

  def tower_names(self) -> tuple[str, ...]:
    """The towers the loss encodes, in order: query, passage[, negative]."""
    return ("query", "passage") + (("negative",) if self.hard_negatives else ())

  def initial_params(self) -> dict:
    """The loss's own trainable parameters (merged into the trainer's params)."""
    if self.learnable_temperature:
      return {"log_scale": jnp.asarray(jnp.log(1.0 / self.temperature), jnp.float32)}
    return {}


def scale_of(params: Mapping[str, Any], config: LossConfig) -> jax.Array:
  """The logit scale t: exp(params["log_scale"]) clipped at MAX_SCALE, or 1 / temperature."""
  if config.learnable_temperature:
    return jnp.minimum(jnp.exp(params["log_scale"]), MAX_SCALE)
  return jnp.asarray(1.0 / config.temperature, jnp.float32)


# --- the loss on embeddings -----------------------------------------------------------------------
def _masked_log_softmax_at_diagonal(logits: jax.Array, same_id: jax.Array | None) -> jax.Array:
  """-log softmax(logits)[i, i] with off-diagonal same-id entries removed.  logits: [B, N], N >= B."""
  b = logits.shape[0]
  if same_id is not None:
    eye = jnp.eye(b, logits.shape[1], dtype=bool)
    drop = same_id & ~eye  # [B, N]; the own positive (diagonal) always stays
    logits = jnp.where(drop, -jnp.inf, logits)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.diagonal(log_probs)  # [B]


def _either(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
  """Elementwise OR of two optional masks."""
  if a is None or b is None:
    return b if a is None else a
  return a | b


def relevant_candidates(relevant_passage_ids: jax.Array,
                        candidate_passage_id: jax.Array) -> jax.Array:
  """[B, C]: candidate j's passage is one of row i's positives ([B, K] ids, -1 padding)."""
  hit = relevant_passage_ids[:, :, None] == candidate_passage_id[None, None, :]  # [B, K, C]
  return jnp.any(hit & (relevant_passage_ids[:, :, None] >= 0), axis=1)


def embedding_loss(query_emb: jax.Array, passage_emb: jax.Array, negative_emb: jax.Array | None,
                   question_id: jax.Array | None, batch_type: jax.Array, scale: jax.Array,
                   config: LossConfig, *, passage_id: jax.Array | None = None,
                   negative_passage_id: jax.Array | None = None,
                   relevant_passage_ids: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """InfoNCE on embeddings of the GLOBAL batch.

  Args:
    query_emb: [B, D] float32, L2-normalised.
    passage_emb: [B, D] positives (row i is query i's).
    negative_emb: [B, D] hard negatives, or None (required when config.hard_negatives).
    question_id: [B] int; rows with equal ids are never negatives of each other (mask_same_id).
    batch_type: [B] int in {0 mono, 1 xy, 2 mixed}, for the per-type breakdown.
    scale: scalar logit scale (1 / temperature).
    passage_id, negative_passage_id: [B] int passage ids of the positives and hard negatives;
    relevant_passage_ids: [B, K] int ids of each row's positives in every language, -1 padding
      (mask_false_negatives): a candidate whose passage is one of them is dropped for the row.
  Returns:
    (mean loss, aux) with aux: loss_per_type_sum [3], rows_per_type [3] (so means can be
    accumulated over steps), accuracy (query's positive ranked first among its candidates), scale.
  """
  query_emb = query_emb.astype(jnp.float32)
  passage_emb = passage_emb.astype(jnp.float32)
  b = query_emb.shape[0]
  shared_positive = None  # [B, B]: positive j must not be a negative of row i
  if config.mask_same_id:
    shared_positive = question_id[:, None] == question_id[None, :]  # [B, B]
  if config.mask_false_negatives:
    if passage_id is None or relevant_passage_ids is None or (
        config.hard_negatives and negative_passage_id is None):
      raise LossConfigError("mask_false_negatives=True but no passage ids were given")
    # [B, B]: positive j is one of row i's positives (not symmetric).
    shared_positive = _either(shared_positive,
                              relevant_candidates(relevant_passage_ids, passage_id))

  # Query -> passage: candidates are [positives (B) | hard negatives (B)]; the label is column i.
  candidates, candidate_mask = [], []
  qp = scale * query_emb @ passage_emb.T  # [B, B]
  if not config.in_batch_negatives:
    # Only the own positive survives from the positives block.
    candidate_mask.append(~jnp.eye(b, dtype=bool))
  elif shared_positive is not None:
    candidate_mask.append(shared_positive)
  else:
    candidate_mask.append(jnp.zeros((b, b), bool))
  candidates.append(qp)
  if config.hard_negatives:
    if negative_emb is None:
      raise LossConfigError("hard_negatives=True but no negative embeddings were given")
    candidates.append(scale * query_emb @ negative_emb.astype(jnp.float32).T)  # [B, B]
    if config.mask_false_negatives:
      # Hard negative j (j = i included) that is row i's positive passage: a false negative.
      candidate_mask.append(relevant_candidates(relevant_passage_ids, negative_passage_id))
    else:
      candidate_mask.append(jnp.zeros((b, b), bool))  # assumed never a positive
  logits = jnp.concatenate(candidates, axis=1)  # [B, B or 2B]
  drop = jnp.concatenate(candidate_mask, axis=1)
  row_loss = _masked_log_softmax_at_diagonal(logits, drop)  # [B]
  masked_logits = jnp.where(drop & ~jnp.eye(b, logits.shape[1], dtype=bool), -jnp.inf, logits)
  accuracy = jnp.mean(jnp.argmax(masked_logits, axis=1) == jnp.arange(b))

  if config.symmetric:
    # Passage -> query: d+_i against every query; query j is dropped when d+_i is one of its
    # positives, i.e. shared_positive[j, i].
    pq = qp.T  # [B, B]
    if not config.in_batch_negatives:
      pq_drop = ~jnp.eye(b, dtype=bool)
    else:
      pq_drop = shared_positive.T if shared_positive is not None else jnp.zeros((b, b), bool)
    row_loss = 0.5 * (row_loss + _masked_log_softmax_at_diagonal(pq, pq_drop))

  types = jax.nn.one_hot(batch_type, len(BATCH_TYPE_NAMES), dtype=jnp.float32)  # [B, 3]
  aux = {
      "loss_per_type_sum": types.T @ row_loss,  # [3]
      "rows_per_type": types.sum(axis=0),  # [3]
      "accuracy": accuracy,
      "scale": jnp.asarray(scale, jnp.float32),
  }
  return jnp.mean(row_loss), aux


# --- batch -> towers ------------------------------------------------------------------------------
_TOWERS = (("query", 0), ("passage", 1), ("negative", 2))


def _towers(batch: Mapping[str, jax.Array], config: LossConfig):
  """[(name, input_ids [B, L], attention_mask [B, L], tower index)] the loss encodes."""
  names = ["query", "passage"] + (["negative"] if config.hard_negatives else [])
  return [(name, batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"], index)
          for name, index in _TOWERS if name in names]


def _tower_rng(rng: jax.Array | None, tower: int) -> jax.Array | None:
  return None if rng is None else jax.random.fold_in(rng, tower)


def loss_on_embeddings(embeddings: dict, params: Mapping[str, Any], batch, config: LossConfig):
  """The loss given each tower's embeddings ({"query", "passage"[, "negative"]}: [B, D]); what
  GradCache differentiates with respect to the embeddings."""
  return embedding_loss(embeddings["query"], embeddings["passage"], embeddings.get("negative"),
                        batch.get("question_id"), batch["batch_type"], scale_of(params, config),
                        config, passage_id=batch.get("passage_id"),
                        negative_passage_id=batch.get("negative_passage_id"),
                        relevant_passage_ids=batch.get("relevant_passage_ids"))


# --- plain ----------------------------------------------------------------------------------------
def batch_loss(encode_fn: EncodeFn, params: Mapping[str, Any], batch: Mapping[str, jax.Array],
               rng: jax.Array | None, config: LossConfig) -> tuple[jax.Array, dict]:
  """Encodes every tower of the batch in one go and returns (loss, aux).

  params: {"encoder": encoder params[, "log_scale": scalar]}; rng: dropout key, None = no dropout.
  """
  if config.packed:
    return loss_on_embeddings(_packed_embeddings(encode_fn, params, batch, rng, config), params,
                              batch, config)
  # Towers with the same padded length go through the encoder as ONE call of [B * k, L] rows: one
  # encoder graph to compile instead of k, and bigger matmuls. Rows are independent, so the
  # embeddings are the same as with separate calls (dropout masks differ, as with any key).
  groups: dict[int, list] = {}
  for name, ids, mask, tower in _towers(batch, config):
    groups.setdefault(ids.shape[1], []).append((name, ids, mask, tower))
  # Rows are interleaved ([B, k, L] -> [B * k, L]), not concatenated, so that each device's block
  # of the batch stays on that device: no resharding under data parallelism.
  embeddings = {}
  for members in groups.values():
    ids = jnp.stack([m[1] for m in members], axis=1)  # [B, k, L]
    mask = jnp.stack([m[2] for m in members], axis=1)
    b, k, length = ids.shape
    emb = encode_fn(params["encoder"], ids.reshape(b * k, length), mask.reshape(b * k, length),
                    _tower_rng(rng, members[0][3]))
    emb = emb.reshape(b, k, -1)  # [B, k, D]
    for i, (name, *_rest) in enumerate(members):
      embeddings[name] = emb[:, i]
  return loss_on_embeddings(embeddings, params, batch, config)


def _packed_embeddings(encode_fn: EncodeFn, params, batch, rng, config: LossConfig) -> dict:
  """{tower: [B, D]} from the batch's packed rows (data/packing.py pack_towers): every tower's
  texts in ONE encoder call over the shared rows."""
  towers = config.tower_names()
  index = _packed_index(batch, config)
  b = index.shape[0] // len(towers)
  # Dropout masks differ from the padded path's (other shapes), as with any key.
  emb = encode_fn(params["encoder"], batch["packed_input_ids"], None, _tower_rng(rng, 0),
                  segment_ids=batch["packed_segment_ids"],
                  segment_positions=batch["packed_segment_positions"],
                  segment_index=index)
  emb = emb.reshape(b, len(towers), -1)
  return {name: emb[:, i] for i, name in enumerate(towers)}


def _packed_index(batch, config: LossConfig) -> jax.Array:
  """[B * k, 2] (row, segment) of every text the loss encodes, k = towers: [B, k, 2] -> [B * k, 2],
  interleaved like the padded path, so that each device's block of the batch (and of the rows its
  index points into) stays on that device."""
  index = jnp.stack([batch[packing.segment_index_key(t)] for t in config.tower_names()], axis=1)
  b, k, _ = index.shape
  return index.reshape(b * k, 2)


def value_and_grad(encode_fn: EncodeFn, params, batch, rng, config: LossConfig):
  """((loss, aux), grads) with the plain loss, or GradCache when config.chunk_size > 0."""
  if config.chunk_size:
    return gradcache_value_and_grad(encode_fn, params, batch, rng, config)
  return jax.value_and_grad(batch_loss, argnums=1, has_aux=True)(encode_fn, params, batch, rng,
                                                                  config)


# --- GradCache ------------------------------------------------------------------------------------
def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
  """[B, ...] -> [B / C, C, ...]; chunk k holds rows k, k + B/C, ... (strided, see module doc)."""
  num_chunks = x.shape[0] // chunk_size
  return x.reshape(chunk_size, num_chunks, *x.shape[1:]).swapaxes(0, 1)


def from_chunks(x: jax.Array) -> jax.Array:
  """Inverse of to_chunks: [B / C, C, ...] -> [B, ...]."""
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def _chunk_rngs(rng: jax.Array | None, tower: int, num_chunks: int) -> jax.Array | None:
  if rng is None:
    return None
  tower_rng = _tower_rng(rng, tower)
  return jax.vmap(lambda k: jax.random.fold_in(tower_rng, k))(jnp.arange(num_chunks))


def gradcache_value_and_grad(encode_fn: EncodeFn, params, batch, rng, config: LossConfig):
  """((loss, aux), grads) of `batch_loss`, in memory bounded by config.chunk_size rows.

  See the module docstring for the three passes and their memory. Same signature and result
  structure as `jax.value_and_grad(batch_loss, argnums=1, has_aux=True)`.
  """
  if config.packed:
    return _packed_gradcache_value_and_grad(encode_fn, params, batch, rng, config)
  chunk_size = config.chunk_size
  towers = _towers(batch, config)
  rows = towers[0][1].shape[0]
  if rows % chunk_size:
    raise LossConfigError(f"gradcache chunk size {chunk_size} does not divide the batch of {rows}")
  num_chunks = rows // chunk_size
  encoder_params = params["encoder"]

  def encode_chunk(p, ids, mask, key):
    return encode_fn(p, ids, mask, key)

  # 1. Embeddings of every tower, chunk by chunk, forward only (no activations survive a chunk).
  embeddings, chunked_inputs = {}, {}
  for name, ids, mask, tower in towers:
    keys = _chunk_rngs(rng, tower, num_chunks)
    xs = (to_chunks(ids, chunk_size), to_chunks(mask, chunk_size), keys)
    chunked_inputs[name] = xs
    frozen = jax.lax.stop_gradient(encoder_params)
    emb = jax.lax.map(lambda x, frozen=frozen: encode_chunk(frozen, x[0], x[1], x[2]), xs)
    embeddings[name] = from_chunks(emb)  # [B, D]

  # 2. Loss and gradients with respect to the embeddings (and the loss's own parameters).
  loss_params = {k: v for k, v in params.items() if k != "encoder"}

  def loss_fn(embs, lp):
    return loss_on_embeddings(embs, lp, batch, config)

  (loss, aux), (embedding_grads, loss_param_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(embeddings, loss_params)

  # 3. Re-encode chunk by chunk and pull the cached embedding gradients back to the parameters.
  def backward_chunk(accumulated, x):
    ids, mask, key, emb_grad = x
    _, pullback = jax.vjp(lambda p: encode_chunk(p, ids, mask, key), encoder_params)
    (grad,) = pullback(emb_grad)
    return jax.tree.map(jnp.add, accumulated, grad), None

  encoder_grads = jax.tree.map(jnp.zeros_like, encoder_params)
  for name, _, _, _ in towers:
    ids, mask, keys = chunked_inputs[name]
    xs = (ids, mask, keys, to_chunks(embedding_grads[name], chunk_size))
    encoder_grads, _ = jax.lax.scan(backward_chunk, encoder_grads, xs)

  grads = dict(loss_param_grads)
  grads["encoder"] = encoder_grads
  return (loss, aux), grads


def _packed_gradcache_value_and_grad(encode_fn: EncodeFn, params, batch, rng, config: LossConfig):
  """GradCache over chunks of config.chunk_size PACKED rows (module docstring, "GradCache with
  packed rows"); the same result as `jax.value_and_grad(batch_loss)` on the packed batch."""
  chunk_size = config.chunk_size
  towers = config.tower_names()
  rows = batch["packed_input_ids"].shape[0]
  config.check_packed_chunks(rows)
  num_chunks = rows // chunk_size
  encoder_params = params["encoder"]
  index = _packed_index(batch, config)  # [N, 2] global (row, segment) of every text
  num_texts = index.shape[0]
  # Row r is row r // num_chunks of chunk r % num_chunks (to_chunks).
  text_chunk = index[:, 0] % num_chunks  # [N]
  local_index = jnp.stack([index[:, 0] // num_chunks, index[:, 1]], axis=1)  # [N, 2]
  xs = (to_chunks(batch["packed_input_ids"], chunk_size),
        to_chunks(batch["packed_segment_ids"], chunk_size),
        to_chunks(batch["packed_segment_positions"], chunk_size),
        jnp.arange(num_chunks), _chunk_rngs(rng, 0, num_chunks))

  def encode_chunk(p, x):
    """([N] bool: text n is in this chunk, [N, D] embeddings: exact for those, dummies else)."""
    ids, segment_ids, positions, chunk, key = x
    mine = text_chunk == chunk
    has_padding = jnp.any(segment_ids == 0, axis=1)  # [C]
    # A segment that exists: a padding one, else (the chunk has no padding) row 0's first text.
    dummy = jnp.where(jnp.any(has_padding),
                      jnp.stack([jnp.argmax(has_padding).astype(index.dtype), 0]),
                      jnp.array([0, 1], index.dtype))
    chunk_index = jnp.where(mine[:, None], local_index, dummy[None, :])
    emb = encode_fn(p, ids, None, key, segment_ids=segment_ids, segment_positions=positions,
                    segment_index=chunk_index)
    return mine, emb

  # 1. Every text's embedding from its own chunk, forward only.
  frozen = jax.lax.stop_gradient(encoder_params)
  emb_shape = jax.eval_shape(lambda x: encode_chunk(frozen, x)[1],
                             jax.tree.map(lambda a: a[0], xs))

  def forward_chunk(embeddings, x):
    mine, emb = encode_chunk(frozen, x)
    return jnp.where(mine[:, None], emb, embeddings), None

  flat, _ = jax.lax.scan(forward_chunk, jnp.zeros(emb_shape.shape, emb_shape.dtype), xs)
  per_tower = flat.reshape(num_texts // len(towers), len(towers), -1)
  embeddings = {name: per_tower[:, i] for i, name in enumerate(towers)}

  # 2. Loss and gradients with respect to the embeddings (and the loss's own parameters).
  loss_params = {k: v for k, v in params.items() if k != "encoder"}
  (loss, aux), (embedding_grads, loss_param_grads) = jax.value_and_grad(
      lambda embs, lp: loss_on_embeddings(embs, lp, batch, config), argnums=(0, 1),
      has_aux=True)(embeddings, loss_params)
  flat_grads = jnp.stack([embedding_grads[name] for name in towers], axis=1).reshape(
      num_texts, -1)  # [N, D], in the order of `index`

  # 3. Re-encode chunk by chunk; each chunk's VJP gets its own texts' cached gradients, 0 else.
  def backward_chunk(accumulated, x):
    _, pullback, mine = jax.vjp(lambda p: encode_chunk(p, x)[::-1], encoder_params, has_aux=True)
    (grad,) = pullback(jnp.where(mine[:, None], flat_grads, 0.0).astype(emb_shape.dtype))
    return jax.tree.map(jnp.add, accumulated, grad), None

  encoder_grads, _ = jax.lax.scan(backward_chunk, jax.tree.map(jnp.zeros_like, encoder_params),
                                  xs)
  grads = dict(loss_param_grads)
  grads["encoder"] = encoder_grads
  return (loss, aux), grads
