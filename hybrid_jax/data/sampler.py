"""The batch sampler: which question ids, in which query/passage languages, form batch t.

A plan is a pure function of (seed, stream, step) and the training data: the random generator of
step t is `numpy.random.default_rng([seed, stream, t])`, so resuming at step k gives exactly the
batches an uninterrupted run sees, with no iterator state, and every host computes the same global
plan and keeps its own contiguous slice of rows (`BatchPlan.host_slice`).

Batch types (config.data.batch_type):
  mono    X-X-mono: one language L for the whole batch, L ~ language weights; B distinct ids that
          exist in L; query and passage both in L.
  xy      X-Y: B distinct ids among those with >= 2 languages; per row, the query language X is
          drawn from the weights restricted to the id's languages, then the passage language Y from
          the weights restricted to the id's other languages, so X != Y in every row and no row
          ever pairs a language the id lacks.
  hybrid  each batch is mono with probability alpha, else xy (the paper's method).
  mixed   ablation: one batch mixes both kinds of rows; B distinct ids with >= 2 languages, each
          row mono (X = Y) with probability alpha, else X != Y, languages drawn as for xy.
Rows carry batch type ids 0 (mono), 1 (xy), 2 (mixed) (row_types.py); a hybrid batch is 0 or 1.

Language weights (config.data.language_weighting) over the K training languages, n_L = number of
training ids in language L: "uniform" 1/K; "size" n_L / sum n; "temperature" n_L^T / sum n^T.

Repeat policy (config.data.repeat_policy): a batch never holds an id twice when it can be filled
without repeats. "error" (default): a batch size larger than a language can fill (mono) or larger
than the ids with >= 2 languages (xy, mixed) is an error raised before training starts. "repeat":
such a batch is filled with whole random permutations of the pool, so an id appears at most
ceil(B / pool) times; rows sharing an id are masked as negatives by the loss (question_id).
Validation plans always use "repeat" (a small held-out split must still give full batches).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from hybrid_jax.data.records import DataError
from hybrid_jax.data.row_types import ROW_TYPE_IDS, ROW_TYPE_NAMES  # re-exported: batch_type ids

BATCH_TYPES = ("mono", "xy", "hybrid", "mixed")
WEIGHTINGS = ("uniform", "size", "temperature")
REPEAT_POLICIES = ("error", "repeat")
TRAIN_STREAM, VALIDATION_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """The rows of one (global or host-local) batch."""

  step: int
  batch_type: str  # mono | xy | mixed (a hybrid batch is resolved to mono or xy)
  example: np.ndarray  # [B] int64: row of each pair in the corpus (its question id index)
  query_lang: np.ndarray  # [B] int32: language index of the query
  passage_lang: np.ndarray  # [B] int32: language index of the positive (and hard negative)

  @property
  def batch_type_id(self) -> int:
    return ROW_TYPE_IDS[self.batch_type]

  def __len__(self) -> int:
    return len(self.example)

  def host_slice(self, process_index: int, process_count: int) -> "BatchPlan":
    """Rows [i * B/P, (i+1) * B/P) of the global plan: host i's part of the global batch."""
    size = host_batch_size(len(self.example), process_count)
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    rows = slice(process_index * size, (process_index + 1) * size)
    return BatchPlan(self.step, self.batch_type, self.example[rows], self.query_lang[rows],
                     self.passage_lang[rows])


def host_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0:
    raise DataError(f"the global batch size must be positive, found {global_batch_size}")
  if process_count <= 0 or global_batch_size % process_count:
    raise DataError(
        f"the global batch size {global_batch_size} is not divisible by the number of processes "
        f"{process_count}; choose a batch size that is a multiple of {process_count}.")
  return global_batch_size // process_count


def language_weights(counts: np.ndarray, weighting: str, temperature: float) -> np.ndarray:
  """[K] float64 probabilities of the languages, from their training id counts."""
  counts = np.asarray(counts, dtype=np.float64)
  if weighting == "uniform":
    weights = np.ones_like(counts)
  elif weighting == "size":
    weights = counts
  elif weighting == "temperature":
    if not temperature > 0:
      raise DataError(f"data.language_temperature must be > 0, found {temperature}")
    weights = counts ** temperature
  else:
    raise DataError(f"data.language_weighting must be one of {WEIGHTINGS}, found {weighting!r}")
  return weights / weights.sum()


def _draw_distinct(rng: np.random.Generator, pool_size: int, count: int) -> np.ndarray:
  """`count` indices into a pool: distinct if the pool is big enough, else whole permutations."""
  if pool_size >= count:
    return rng.choice(pool_size, size=count, replace=False)
  repeats = math.ceil(count / pool_size)
  return np.concatenate([rng.permutation(pool_size) for _ in range(repeats)])[:count]


def _draw_categorical(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
  """Row-wise categorical draw: [B, K] non-negative weights (each row > 0), [B] uniforms -> [B]."""
  cumulative = np.cumsum(weights, axis=1)
  thresholds = uniforms * cumulative[:, -1]
  index = np.sum(cumulative <= thresholds[:, None], axis=1)
  # u * total can round up to total; fall back to the last language with weight in that case.
  last_positive = weights.shape[1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=1)
  return np.minimum(index, last_positive)


class BatchSampler:
  """Plans batches over a fixed set of training ids.

  Args:
    presence: [N, K] bool, id n exists in language k (the whole corpus).
    rows: the corpus rows this sampler draws from (e.g. the training split); None = all N.
      Plans hold corpus rows, so a row index is also a question id index shared by all splits.
    languages: the K language codes (for messages).
    batch_type, alpha, weighting, temperature, seed, repeat_policy: see the module docstring.
    stream: TRAIN_STREAM or VALIDATION_STREAM, so validation plans never equal training plans.
  """

  def __init__(self, presence: np.ndarray, languages: Sequence[str], *,
               rows: np.ndarray | None = None, batch_type: str,
               alpha: float = 0.5, weighting: str = "uniform", temperature: float = 0.3,
               seed: int = 0, repeat_policy: str = "error", stream: int = TRAIN_STREAM,
               allow_empty_languages: bool = False):
    if batch_type not in BATCH_TYPES:
      raise DataError(f"data.batch_type must be one of {BATCH_TYPES}, found {batch_type!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
      raise DataError(f"data.alpha must be in [0, 1] (the probability of a mono batch), "
                      f"found {alpha}")
    if repeat_policy not in REPEAT_POLICIES:
      raise DataError(f"data.repeat_policy must be one of {REPEAT_POLICIES}, found {repeat_policy!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise DataError(f"data.seed must be a non-negative integer, found {seed!r}")
    presence = np.asarray(presence, dtype=bool)
    self.rows = np.arange(len(presence)) if rows is None else np.asarray(rows, dtype=np.int64)
    self.presence = presence[self.rows]  # [n, K] the pool, in pool order
    self.languages = tuple(languages)
    if self.presence.ndim != 2 or self.presence.shape[1] != len(self.languages):
      raise ValueError(f"presence {self.presence.shape} does not match {len(self.languages)} languages")
    self.batch_type, self.alpha, self.seed = batch_type, float(alpha), int(seed)
    self.repeat_policy, self.stream = repeat_policy, stream
    self._checked_batch_sizes: set[int] = set()
    self.counts = self.presence.sum(axis=0)  # [K] ids per language
    empty = [lang for lang, c in zip(self.languages, self.counts) if c == 0]
    if empty and not allow_empty_languages:
      raise DataError(
          f"language(s) {empty} have no training examples (after the validation split). Remove "
          "them from data.languages or provide data for them.")
    self.weights = language_weights(self.counts, weighting, temperature)  # [K]
    if empty:  # validation only: a language the small held-out split happens to lack
      self.weights = np.where(self.counts > 0, self.weights, 0.0)
      self.weights /= self.weights.sum()
    self.members = [np.flatnonzero(self.presence[:, k]) for k in range(len(self.languages))]
    self.multilingual = np.flatnonzero(self.presence.sum(axis=1) >= 2)  # ids usable for X-Y rows
    if self.uses_multilingual_pool and len(self.multilingual) == 0:
      raise DataError(
          f"batch type {batch_type!r} needs cross-lingual (X-Y) rows, but no training id exists in "
          f"two or more of the languages {list(self.languages)}. Use batch_type='mono' or add "
          "languages.")

  @classmethod
  def from_config(cls, data_config, presence: np.ndarray, languages: Sequence[str],
                  rows: np.ndarray | None = None, validation: bool = False) -> "BatchSampler":
    """The training (or, with validation=True, the validation) sampler of `config.data`.

    Validation batches are of data.validation_batch_type / data.validation_alpha (default hybrid,
    0.5: mono and X-Y batches alternating), the same for every training strategy, so that the
    validation losses, and the best checkpoints chosen by them, of X-X-mono, X-Y and hybrid runs
    are measured on identical batches. "" = the run's own batch type and alpha."""
    common = dict(rows=rows, batch_type=data_config.batch_type, alpha=data_config.alpha,
                  weighting=data_config.language_weighting,
                  temperature=data_config.language_temperature, seed=data_config.seed)
    if validation:
      if data_config.get("validation_batch_type"):
        if data_config.validation_batch_type not in BATCH_TYPES:
          raise DataError(f"data.validation_batch_type must be one of {BATCH_TYPES} or '' (the "
                          f"run's own), found {data_config.validation_batch_type!r}")
        common.update(batch_type=data_config.validation_batch_type,
                      alpha=float(data_config.get("validation_alpha", 0.5)))
      return cls(presence, languages, repeat_policy="repeat", stream=VALIDATION_STREAM,
                 allow_empty_languages=True, **common)
    return cls(presence, languages, repeat_policy=data_config.repeat_policy, **common)

  @property
  def uses_mono_batches(self) -> bool:
    return self.batch_type == "mono" or (self.batch_type == "hybrid" and self.alpha > 0)

  @property
  def uses_multilingual_pool(self) -> bool:
    """Whether some batches draw from the ids with >= 2 languages (xy and mixed batches)."""
    return self.batch_type in ("xy", "mixed") or (self.batch_type == "hybrid" and self.alpha < 1)

  @property
  def mono_batch_share(self) -> float:
    """Expected fraction of mono batches (mixed batches count as neither)."""
    return {"mono": 1.0, "xy": 0.0, "hybrid": self.alpha, "mixed": 0.0}[self.batch_type]

  def check_batch_size(self, batch_size: int) -> None:
    """Raises if a batch of this size cannot be filled without repeats (policy "error")."""
    host_batch_size(batch_size, 1)
    if self.repeat_policy == "repeat":
      return
    problems = []
    if self.uses_mono_batches:
      problems += [f"{lang} has {c} ids" for lang, c, w in
                   zip(self.languages, self.counts, self.weights) if c < batch_size and w > 0]
    if self.uses_multilingual_pool and len(self.multilingual) < batch_size:
      problems.append(f"only {len(self.multilingual)} ids exist in two or more languages "
                      "(needed for X-Y rows)")
    if problems:
      raise DataError(
          f"global batch size {batch_size} cannot be filled with distinct ids: "
          f"{'; '.join(problems)}. Use a smaller batch size, drop small languages from "
          "data.languages, or set data.repeat_policy='repeat' (ids may then repeat in a batch).")

  def plan(self, step: int, batch_size: int, *, force_type: str | None = None,
           force_language: int | None = None) -> BatchPlan:
    """The global plan of batch `step` ([batch_size] rows). Pure in (seed, stream, step).

    force_type ("mono" | "xy" | "mixed") and force_language (a mono batch's language index) are for
    the fixed validation list, which covers every batch type and language evenly.
    """
    if step < 0:  # e.g. `python -m hybrid_jax.data.plan --start=-1`
      raise DataError(f"step must be >= 0, found {step}")
    if force_type is None and batch_size not in self._checked_batch_sizes:
      # The "error" repeat policy holds for every plan, not only for callers that checked first:
      # otherwise a too-small language would silently repeat ids whenever it is drawn.
      self.check_batch_size(batch_size)
      self._checked_batch_sizes.add(batch_size)
    rng = np.random.default_rng([self.seed, self.stream, step])
    # The first draw always decides the type, so that mono == hybrid(alpha=1) batch for batch.
    is_mono = rng.random() < self.alpha
    batch_type = force_type or {"mono": "mono", "xy": "xy", "mixed": "mixed",
                                "hybrid": "mono" if is_mono else "xy"}[self.batch_type]
    if batch_type == "mono":
      lang = (force_language if force_language is not None
              else int(rng.choice(len(self.languages), p=self.weights)))
      members = self.members[lang]
      example = members[_draw_distinct(rng, len(members), batch_size)]
      query_lang = passage_lang = np.full(batch_size, lang, dtype=np.int32)
    else:
      example = self.multilingual[_draw_distinct(rng, len(self.multilingual), batch_size)]
      available = self.presence[example] * self.weights[None, :]  # [B, K]
      query_lang = _draw_categorical(available, rng.random(batch_size)).astype(np.int32)
      others = available.copy()
      others[np.arange(batch_size), query_lang] = 0.0
      passage_lang = _draw_categorical(others, rng.random(batch_size)).astype(np.int32)
      if batch_type == "mixed":
        same = rng.random(batch_size) < self.alpha
        passage_lang = np.where(same, query_lang, passage_lang).astype(np.int32)
    return BatchPlan(step, batch_type, self.rows[example], query_lang, passage_lang)

  def validation_plans(self, batch_size: int, num_batches: int) -> list[BatchPlan]:
    """A fixed list covering the run's batch types evenly; mono batches cycle over languages."""
    if num_batches <= 0:
      raise DataError(f"data.validation_batches must be positive, found {num_batches}")
    types = {"mono": ["mono"], "xy": ["xy"], "mixed": ["mixed"],
             "hybrid": [t for t, used in (("mono", self.alpha > 0), ("xy", self.alpha < 1)) if used]
             }[self.batch_type]
    plans = []
    for i in range(num_batches):
      batch_type = types[i % len(types)]
      nonempty = np.flatnonzero(self.counts > 0)
      language = (int(nonempty[(i // len(types)) % len(nonempty)]) if batch_type == "mono"
                  else None)
      plans.append(self.plan(i, batch_size, force_type=batch_type, force_language=language))
    return plans
