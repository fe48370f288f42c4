"""Training input: corpus -> held-out split -> tokens (once) -> sampler plans -> tf.data batches.

The trainer's entry point:

    data = TrainingData.from_config(config)            # whole experiment config (or config.data)
    print(data.summary(config.train.batch_size))
    it = data.train_batches(config.train.batch_size, start_step=step,
                            process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)                                   # host-local numpy arrays, see BATCH_KEYS
    val = data.validation_batches(config.train.batch_size, process_index=..., process_count=...)

Each host gets rows [i * B/P, (i+1) * B/P) of the global batch (B = global batch size, P hosts);
the trainer assembles the global array from the host slices in process order. Batch t is a pure
function of (config.data.seed, t), so `start_step=k` resumes exactly.

Batch arrays (b = B / P rows on this host):
  query_input_ids, query_attention_mask          [b, query_max_length] int32
  passage_input_ids, passage_attention_mask      [b, passage_max_length] int32
  negative_input_ids, negative_attention_mask    [b, passage_max_length] int32 (hard_negatives)
  question_id   [b] int32  corpus row of the id: equal across rows <=> same question (loss mask)
  passage_id    [b] int32  passage of the positive (data/passage_ids.py): equal <=> same passage
  relevant_passage_ids [b, K] int32  passage ids of the row's record's positives in every
                language (-1: the record lacks it); a candidate whose passage_id or
                negative_passage_id is among them is a false negative of the row
  negative_passage_id [b] int32  passage of the hard negative (hard_negatives); with the two above
                the loss masks a row's positives wherever they appear (train.mask_false_negatives)
  query_lang    [b] int32  index into TrainingData.languages
  passage_lang  [b] int32  language of the positive; the hard negative is the one the record
                gives for the positive's language (or, if it names one, for the row's query language)
  batch_type    [b] int32  0 mono, 1 xy, 2 mixed (row_types.ROW_TYPE_IDS)

Packed batches (data.packing, off by default; data/packing.py PackingLayout): the trainer asks
`packing_layout(...)` for the run's row count and passes it to train_batches / validation_batches,
which then add packed_input_ids / packed_segment_ids / packed_segment_positions [r, L] (r = this
host's share of the R rows) and query_/passage_/negative_segment_index [b, 2] to every batch: each
batch shard's texts in that shard's own rows, packed on the host after tf.data (~1 ms a batch), so
batch t stays a pure function of (seed, t) and a too-full batch is a PackingError, not a TF error.

tf.data only turns plans into padded arrays: a parallel map runs the NumPy sampler per step, a
second parallel map gathers the token ids from ragged tables and pads them, then prefetch.
TensorFlow is imported lazily (tf_runtime.py), sees no GPU/TPU, and uses a private pool of
data.tf_threads threads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from hybrid_jax.data import packing
from hybrid_jax.data import passage_ids
from hybrid_jax.data import records
from hybrid_jax.data import sampler as sampler_lib
from hybrid_jax.data import sources
from hybrid_jax.data import synthetic
from hybrid_jax.data import tf_runtime
from hybrid_jax.data import tokenization
from hybrid_jax.data import tokenized

BATCH_KEYS = ("query_input_ids", "query_attention_mask", "passage_input_ids",
              "passage_attention_mask", "question_id", "passage_id", "relevant_passage_ids",
              "query_lang", "passage_lang", "batch_type")
NEGATIVE_KEYS = ("negative_input_ids", "negative_attention_mask", "negative_passage_id")
# packing_layout with data.packing_rows = 0: R from the plans of the first steps (all of a shorter
# run, then no margin is needed: no batch can need more rows than the most any of them needed).
PACKING_SAMPLE_STEPS = 2000
PACKING_MARGIN = 1.1

def resolve_tokenizer(config, data_config) -> tokenization.Tokenizer:
  """config.model.tokenizer, else the synthetic source's own, else config.model.init_from."""
  model = config.get("model") if config is not data_config else None
  if model is not None and model.get("tokenizer"):
    return tokenization.Tokenizer.from_dir(model.tokenizer)
  if data_config.source == "synthetic":
    return synthetic.build_tokenizer(synthetic.SyntheticSpec.from_config(data_config.synthetic))
  if model is not None and model.get("init_from"):
    return tokenization.Tokenizer.from_dir(model.init_from)
  raise records.DataError(
      f"data.source={data_config.source!r} needs a tokenizer: set config.model.tokenizer or "
      "config.model.init_from to a Hugging Face model directory with tokenizer.json, or pass "
      "tokenizer= to TrainingData.from_config.")


class TrainingData:
  """Tokenized training and validation data of one config, and the batches made from them."""

  def __init__(self, data_config, corpus: records.ParallelCorpus, tokenizer: tokenization.Tokenizer):
    self.config = data_config
    self.corpus = corpus
    self.tokenizer = tokenizer
    self.languages: tuple[str, ...] = corpus.languages  # index <-> code of the *_lang arrays
    for field in ("query_max_length", "passage_max_length"):
      if data_config[field] < 2:
        raise records.DataError(f"data.{field} must be >= 2 (room for special tokens), "
                                f"found {data_config[field]}")
    validation = sources.validation_mask(corpus, data_config)
    self.train_rows = np.flatnonzero(~validation)  # corpus rows of the training ids
    self.validation_rows = np.flatnonzero(validation)
    presence = corpus.presence
    self.sampler = sampler_lib.BatchSampler.from_config(data_config, presence, self.languages,
                                                        rows=self.train_rows)
    self.validation_sampler = None
    if len(self.validation_rows):
      self.validation_sampler = sampler_lib.BatchSampler.from_config(
          data_config, presence, self.languages, rows=self.validation_rows, validation=True)
    if data_config.hard_negatives:
      missing = np.flatnonzero((presence & np.equal(corpus.negatives, None)).any(axis=1))
      if len(missing):
        row = missing[0]
        langs = [l for k, l in enumerate(self.languages)
                 if presence[row, k] and corpus.negatives[row, k] is None]
        raise records.DataError(
            f"data.hard_negatives=True but {len(missing)} ids in {corpus.source} lack a 'negative' "
            f"in some language, e.g. id {corpus.ids[row]!r} in {langs}. Add negatives or set "
            "data.hard_negatives=False.")
    # Tokenise once; batches only gather and pad.
    self.queries = tokenized.tokenize_field(tokenizer, corpus.queries, data_config.query_prefix,
                                            data_config.query_max_length, "tokenizing queries")
    self.positives = tokenized.tokenize_field(tokenizer, corpus.positives,
                                              data_config.passage_prefix,
                                              data_config.passage_max_length, "tokenizing passages")
    self.negatives = None
    if data_config.hard_negatives:
      # One column per negative slot (corpus.negative_table: K, or K * K by query language).
      self.negatives = tokenized.tokenize_field(tokenizer, corpus.negative_table()[0],
                                                data_config.passage_prefix,
                                                data_config.passage_max_length, "tokenizing negatives")
    self.passage_ids = passage_ids.resolve(corpus)

  @classmethod
  def from_config(cls, config, tokenizer: tokenization.Tokenizer | None = None) -> "TrainingData":
    """Builds everything from the experiment config (or just its `data` section).

    Tokenizer: the argument, else config.model.tokenizer, else the synthetic source's own, else
    config.model.init_from. Without init_from (random init) the tokenizer must fit
    config.model.vocab_size.
    """
    data_config = config.data if "data" in config else config
    if tokenizer is None:
      tokenizer = resolve_tokenizer(config, data_config)
    model = config.get("model") if "data" in config else None
    if model is not None and not model.get("init_from") and model.get("vocab_size"):
      tokenizer.check_fits_embeddings(model.vocab_size, f"config.model ({model.get('backbone')})")
    return cls(data_config, sources.load_corpus(data_config), tokenizer)

  # --- plans ----------------------------------------------------------------------------------
  def plan(self, step: int, global_batch_size: int) -> sampler_lib.BatchPlan:
    """The global plan of training batch `step` (rows are corpus rows)."""
    return self.sampler.plan(step, global_batch_size)

  def ids(self, plan: sampler_lib.BatchPlan) -> list[str]:
    return [self.corpus.ids[i] for i in plan.example]

  def host_batch(self, plan: sampler_lib.BatchPlan) -> dict[str, np.ndarray]:
    """NumPy arrays of a (host-local) plan; the reference the tf.data path is tested against."""
    batch = {}
    batch["query_input_ids"], batch["query_attention_mask"] = self.queries.gather(
        plan.example, plan.query_lang)
    batch["passage_input_ids"], batch["passage_attention_mask"] = self.positives.gather(
        plan.example, plan.passage_lang)
    negative_column = None
    if self.negatives is not None:
      negative_column = self.corpus.negative_column(plan.query_lang, plan.passage_lang)
      batch["negative_input_ids"], batch["negative_attention_mask"] = self.negatives.gather(
          plan.example, negative_column)
    batch.update(self.passage_ids.of_rows(plan.example, plan.passage_lang, negative_column))
    batch["question_id"] = plan.example.astype(np.int32)
    batch["query_lang"] = plan.query_lang.astype(np.int32)
    batch["passage_lang"] = plan.passage_lang.astype(np.int32)
    batch["batch_type"] = np.full(len(plan), plan.batch_type_id, dtype=np.int32)
    return batch

  # --- packing --------------------------------------------------------------------------------
  @property
  def towers(self) -> tuple[str, ...]:
    """The text fields of a batch, in the loss's order."""
    return ("query", "passage") + (("negative",) if self.negatives is not None else ())

  def tower_lengths(self, plan: sampler_lib.BatchPlan) -> list[np.ndarray]:
    """Token counts [b] of each tower's texts of a plan (what packing places)."""
    lengths = [self.queries.lengths(plan.example, plan.query_lang),
               self.positives.lengths(plan.example, plan.passage_lang)]
    if self.negatives is not None:
      column = self.corpus.negative_column(plan.query_lang, plan.passage_lang)
      lengths.append(self.negatives.lengths(plan.example, column))
    return lengths

  def _shard_lengths(self, plans, num_shards: int):
    for plan in plans:
      yield from packing.shard_lengths(self.tower_lengths(plan), num_shards)

  def packing_layout(self, global_batch_size: int, num_shards: int, num_steps: int,
                     process_count: int = 1, chunk_size: int = 0
                     ) -> packing.PackingLayout | None:
    """The run's packed shape when data.packing is on (None when off).

    Rows per batch shard: data.packing_rows / num_shards, or (packing_rows 0) the most rows first-
    fit decreasing needs for any batch shard of steps 0 .. min(num_steps, PACKING_SAMPLE_STEPS) - 1
    of the global plans, times PACKING_MARGIN unless that covered every step, rounded up so that
    GradCache's chunk_size (packed rows per chunk, 0 = plain loss) divides the global rows. A
    pure function of the config and num_steps: the same on every host and after a resume.
    """
    c = self.config
    if not c.get("packing", False):
      return None
    packing.check_config(c)
    if num_shards < 1 or global_batch_size % num_shards or num_shards % process_count:
      raise packing.PackingError(
          f"packing needs the batch of {global_batch_size} rows to split into {num_shards} batch "
          f"shards, {num_shards // max(process_count, 1)} on each of {process_count} hosts")
    if c.packing_rows:
      if c.packing_rows % num_shards:
        raise packing.PackingError(
            f"data.packing_rows={c.packing_rows} is not a multiple of the {num_shards} batch "
            f"shards (each shard packs its rows into its own R / {num_shards}); use a multiple, "
            f"or 0 to choose from the run's batches.")
      if chunk_size and c.packing_rows % chunk_size:
        raise packing.PackingError(
            f"train.gradcache_chunk_size={chunk_size} does not divide data.packing_rows="
            f"{c.packing_rows} (GradCache chunks packed rows); use a multiple of "
            f"{math.lcm(chunk_size, num_shards)}, or packing_rows=0 to choose one.")
      return packing.PackingLayout(num_shards, c.packing_rows // num_shards, c.packing_row_length,
                                   self.towers)
    sampled = max(1, min(num_steps, PACKING_SAMPLE_STEPS))
    plans = (self.plan(t, global_batch_size) for t in range(sampled))
    # Global rows R = rows per shard * num_shards must be a multiple of the chunk size.
    per_shard_multiple = chunk_size // math.gcd(chunk_size, num_shards) if chunk_size else 1
    choice = packing.choose_num_rows(self._shard_lengths(plans, num_shards),
                                     c.packing_row_length,
                                     margin=1.0 if sampled >= num_steps else PACKING_MARGIN,
                                     multiple_of=per_shard_multiple)
    return packing.PackingLayout(num_shards, choice.num_rows, c.packing_row_length, self.towers,
                                 choice)

  def _validation_layout(self, layout: packing.PackingLayout, plans) -> packing.PackingLayout:
    """Validation batches are a fixed list: their rows are the most any of their shards needs
    (exact, so they cannot overflow), whatever the training rows are."""
    choice = packing.choose_num_rows(self._shard_lengths(plans, layout.num_shards),
                                     layout.row_length, margin=1.0)
    return dataclasses.replace(layout, rows_per_shard=choice.num_rows, choice=choice)

  def pack_batch(self, batch: dict[str, np.ndarray], layout: packing.PackingLayout | None,
                 process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """`batch` (host-local, padded) with the packed arrays of `layout` added (None: as is)."""
    if layout is None:
      return batch
    shards_here = layout.num_shards // process_count
    return {**batch, **packing.pack_towers(batch, layout, first_shard=process_index * shards_here,
                                           num_shards=shards_here,
                                           pad_token_id=self.tokenizer.pad_token_id)}

  # --- batches --------------------------------------------------------------------------------
  def train_batches(self, global_batch_size: int, start_step: int = 0, process_index: int = 0,
                    process_count: int = 1, packing_layout: packing.PackingLayout | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Endless host-local batches for steps start_step, start_step + 1, ... (tf.data); with a
    packing_layout, packed too (see the module docstring)."""
    host_size = sampler_lib.host_batch_size(global_batch_size, process_count)
    self.sampler.check_batch_size(global_batch_size)
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    dataset = self._dataset(global_batch_size, host_size, start_step, process_index, process_count)
    if packing_layout is None:
      return dataset.as_numpy_iterator()
    return (self.pack_batch(b, packing_layout, process_index, process_count)
            for b in dataset.as_numpy_iterator())

  def _dataset(self, global_batch_size, host_size, start_step, process_index, process_count):
    tf = tf_runtime.import_tensorflow(self.config.tf_threads)
    tables = self._tf_tables(tf)
    sampler = self.sampler
    # The plan's int32 [b] arrays (relevant_passage_ids [b, K]), in this order; "negative_column"
    # only selects negative cells.
    plan_keys = ["question_id", "query_lang", "passage_lang", "batch_type", "passage_id",
                 "relevant_passage_ids"]
    if self.negatives is not None:
      plan_keys += ["negative_column", "negative_passage_id"]

    def host_plan(step):  # NumPy, runs under tf.numpy_function
      plan = sampler.plan(int(step), global_batch_size).host_slice(process_index, process_count)
      negative_column = (self.corpus.negative_column(plan.query_lang, plan.passage_lang)
                         if self.negatives is not None else None)
      arrays = {"question_id": plan.example, "query_lang": plan.query_lang,
                "passage_lang": plan.passage_lang,
                "batch_type": np.full(host_size, plan.batch_type_id),
                "negative_column": negative_column,
                **self.passage_ids.of_rows(plan.example, plan.passage_lang, negative_column)}
      return [np.asarray(arrays[key], np.int32) for key in plan_keys]

    def plan_op(step):
      arrays = tf.numpy_function(host_plan, [step], [tf.int32] * len(plan_keys), stateful=False)
      shapes = {"relevant_passage_ids": [host_size, len(self.languages)]}
      return {name: tf.ensure_shape(x, shapes.get(name, [host_size]))
              for name, x in zip(plan_keys, arrays)}

    def arrays_op(plan):
      batch = dict(plan)
      batch.pop("negative_column", None)
      for prefix, lang_key, table in (("query", "query_lang", "queries"),
                                      ("passage", "passage_lang", "positives"),
                                      ("negative", "negative_column", "negatives")):
        if table not in tables:
          continue
        ragged, length, cells_per_example = tables[table]
        cells = plan["question_id"] * cells_per_example + plan[lang_key]
        rows = tf.gather(ragged, cells)
        batch[f"{prefix}_input_ids"] = rows.to_tensor(
            default_value=self.tokenizer.pad_token_id, shape=[host_size, length])
        batch[f"{prefix}_attention_mask"] = tf.sequence_mask(
            rows.row_lengths(), length, dtype=tf.int32)
      return batch

    autotune = tf.data.AUTOTUNE
    dataset = tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
    dataset = dataset.map(plan_op, num_parallel_calls=autotune, deterministic=True)
    dataset = dataset.map(arrays_op, num_parallel_calls=autotune, deterministic=True)
    dataset = dataset.prefetch(self.config.prefetch_batches)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = self.config.tf_threads
    options.threading.max_intra_op_parallelism = 1
    return dataset.with_options(options)

  def _tf_tables(self, tf) -> dict:
    if not hasattr(self, "_tables"):
      self._tables = {}
      for name in ("queries", "positives", "negatives"):
        table = getattr(self, name)
        if table is not None:
          ragged = tf.RaggedTensor.from_row_splits(tf.constant(table.values),
                                                   tf.constant(table.row_splits), validate=False)
          self._tables[name] = (ragged, table.max_length, table.num_languages)
    return self._tables

  def validation_batches(self, global_batch_size: int, process_index: int = 0,
                         process_count: int = 1,
                         packing_layout: packing.PackingLayout | None = None
                         ) -> list[dict[str, np.ndarray]]:
    """The fixed list of data.validation_batches host-local batches of held-out ids ([] if none).

    The list alternates the batch types of data.validation_batch_type (default hybrid: mono, xy,
    mono, ...; the same batches whatever the run's own batch type, so strategies compare) and mono
    batches cycle through the languages, so validation loss weighs every type and language evenly. Ids repeat
    within a batch when the held-out split is smaller than the batch (masked by question_id).
    """
    sampler_lib.host_batch_size(global_batch_size, process_count)
    if self.validation_sampler is None:
      return []
    plans = self.validation_sampler.validation_plans(global_batch_size,
                                                     self.config.validation_batches)
    batches = [self.host_batch(p.host_slice(process_index, process_count)) for p in plans]
    if packing_layout is None:
      return batches
    layout = self._validation_layout(packing_layout, plans)
    return [self.pack_batch(b, layout, process_index, process_count) for b in batches]

  # --- reporting ------------------------------------------------------------------------------
  @property
  def num_train_queries(self) -> int:
    """(id, language) pairs in the training split: what one epoch of queries means."""
    return int(self.sampler.presence.sum())

  def steps_per_epoch(self, global_batch_size: int) -> float:
    return self.num_train_queries / global_batch_size

  def summary(self, global_batch_size: int) -> str:
    """Text for the start of training: sizes per language, batch-type shares, steps per epoch.

    Also validates the batch size (divisibility, repeat policy), so that a trainer printing the
    summary first fails before it compiles anything.
    """
    self.sampler.check_batch_size(global_batch_size)
    c = self.config
    train_counts = self.sampler.counts
    presence = self.corpus.presence
    val_counts = presence[self.validation_rows].sum(axis=0)
    lines = [
        f"Training data: {c.source} {self.corpus.source}",
        f"  {len(self.languages)} languages, {self.corpus.num_examples} question ids: "
        f"{len(self.train_rows)} train / {len(self.validation_rows)} validation "
        f"(validation_fraction {c.validation_fraction}, split by "
        f"{sources.validation_unit(c)})",
        f"  {'lang':<6}{'index':>6}{'train ids':>11}{'val ids':>9}{'weight':>9}"]
    for k, lang in enumerate(self.languages):
      lines.append(f"  {lang:<6}{k:>6}{train_counts[k]:>11}{val_counts[k]:>9}"
                   f"{self.sampler.weights[k]:>9.3f}")
    lines.append(f"  ids in >= 2 languages (X-Y pool): {len(self.sampler.multilingual)}")
    mono = self.sampler.mono_batch_share
    if c.batch_type == "mixed":
      shares = f"every batch mixed: rows mono with p={c.alpha}, else X-Y"
    else:
      shares = f"mono {100 * mono:.1f}% / xy {100 * (1 - mono):.1f}% of batches"
    lines += [
        f"Batches: type {c.batch_type}"
        + (f" (alpha {c.alpha})" if c.batch_type in ("hybrid", "mixed") else "")
        + f": {shares}; language weighting "
        f"{c.language_weighting}" + (f" (T={c.language_temperature})"
                                      if c.language_weighting == "temperature" else ""),
        f"  global batch {global_batch_size}; steps per epoch {self.steps_per_epoch(global_batch_size):.1f}"
        f" ({self.num_train_queries} training (id, language) queries / batch); "
        f"repeat policy {c.repeat_policy}; seed {c.seed}",
        f"  validation: {c.validation_batches if self.validation_sampler else 0} fixed batches",
        f"Tokens: {self.tokenizer.source} (vocab {self.tokenizer.vocab_size}); query max "
        f"{c.query_max_length} (prefix {c.query_prefix!r}), passage max {c.passage_max_length} "
        f"(prefix {c.passage_prefix!r}); truncated: {self.queries.num_truncated} queries, "
        f"{self.positives.num_truncated} passages" + (
            f"; hard negatives on ({self.negatives.num_truncated} truncated)"
            if self.negatives is not None else "")]
    return "\n".join(lines)
