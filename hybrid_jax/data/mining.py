"""Hard-negative mining with language control (`python -m hybrid_jax.mine`, see hybrid_jax/mine.py).

A training row pairs a query in language X with a positive in language Y (X = Y in mono rows) and
takes its hard negative from the record's slot (Y, X) (records.py: `negative` when X = Y, else
`negatives_by_query_language[X]`). Mining fills every slot (id, Y, X) of the training data, for
every pair of languages the id has, with a passage retrieved for the query in X:

  1. Embed every query, every positive and every pool passage with the model (TextEmbedder).
  2. The pool: the candidate passages (LAReQA: every sentence of the files; JSONL: the records'
     negatives; plus an optional --pool file), minus every passage that is a gold passage of any
     training question (passage ids, data/passage_ids.py: names and identical texts), so a mined
     negative is never a positive of any row: mined data needs no false-negative mask.
  3. The language of each slot's negative, by policy: "query" (X), "positive" (Y) or "any"
     (no restriction); a mix gives each policy an exact share of the slots (largest remainder
     rounding), assigned by a seeded permutation.
  4. Exact top-`depth` search (hybrid_jax.search.topk) of the slot's query over the pool passages
     in the slot's negative language. A candidate is eligible when its rank in that list is past
     `skip_top`, its score is at most the positive's score minus `margin`, and it is not a passage
     of the same question id in any language. The positive the margin compares with is the
     question's positive in the candidate's language (the slot's Y positive when the id lacks that
     language), scored against the X query: the margin guards against false negatives, which
     compete with the positive in their own language; against a positive in another language it
     would mostly measure the model's preference for the query's language and drop exactly the
     same-language negatives a cross-lingual row needs. The negative is the first eligible
     candidate, or with `sample_top` = m one of the first m drawn uniformly (seeded). Slots with
     too few eligible candidates are searched again with twice the depth, up to the whole pool.
Everything is a pure function of the inputs, the model and `MiningConfig` (seed included).

The output is the project's training JSONL: the input's queries and positives, the mined
negatives with their passage ids, and per record a "meta" entry {"mined": {Y: {X: {...}}}}
(policy, negative language, rank, score, positive score, source uid) that the reader ignores.
A cross-lingual slot without an eligible negative leaves its row to the cell's own negative; a
cell whose own slot (X = Y) has none is left out, so the file trains with data.hard_negatives.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np

from hybrid_jax import errors
from hybrid_jax.data import lareqa
from hybrid_jax.data import passage_ids
from hybrid_jax.data import records
from hybrid_jax.search import topk

POLICIES = ("query", "positive", "any")
ANY_LANGUAGE = -1

EmbedFn = Callable[[Sequence[str], str], np.ndarray]  # (texts, prefix) -> [N, D] unit rows


class MiningError(errors.UserError):
  """Mining options or inputs do not fit together; the message says what to change."""


# --- options ----------------------------------------------------------------------------------
def parse_language_shares(text: str) -> tuple[tuple[str, float], ...]:
  """"query" | "positive" | "any" | "query:0.5,positive:0.5" -> ((policy, share), ...)."""
  shares: dict[str, float] = {}
  for item in (part.strip() for part in text.split(",")):
    if not item:
      continue
    name, has_share, value = item.partition(":")
    name = name.strip()
    if name not in POLICIES:
      raise MiningError(f"--negative_language: unknown policy {name!r} in {text!r}; expected "
                        f"{' | '.join(POLICIES)} or a mix like 'query:0.5,positive:0.5'")
    if name in shares:
      raise MiningError(f"--negative_language names {name!r} twice in {text!r}")
    try:
      share = float(value) if has_share else 1.0
    except ValueError as e:
      raise MiningError(f"--negative_language: share {value!r} of {name!r} is not a number "
                        f"(e.g. 'query:0.5,positive:0.5')") from e
    if not 0.0 <= share <= 1.0:
      raise MiningError(f"--negative_language: share of {name!r} must be in [0, 1], found {share}")
    shares[name] = share
  if not shares:
    raise MiningError("--negative_language is empty; expected query | positive | any, or a mix "
                      "like 'query:0.5,positive:0.5'")
  total = sum(shares.values())
  if abs(total - 1.0) > 1e-6:
    raise MiningError(f"--negative_language shares must sum to 1, found {total:g} in {text!r}; "
                      "e.g. 'query:0.5,positive:0.5'")
  return tuple(shares.items())


@dataclasses.dataclass(frozen=True)
class MiningConfig:
  """How negatives are chosen (see the module docstring)."""
  language_shares: tuple[tuple[str, float], ...] = (("query", 1.0),)  # policy -> share of slots
  skip_top: int = 0  # ranks 1 .. skip_top of the slot's language-filtered list are never taken
  margin: float | None = None  # eligible only if score <= positive score - margin; None = off
  depth: int = 64  # candidates retrieved per query at first (doubled where too few are eligible)
  sample_top: int = 1  # pick uniformly among the first sample_top eligible candidates
  seed: int = 0

  def validate(self) -> "MiningConfig":
    for name, minimum in (("skip_top", 0), ("depth", 1), ("sample_top", 1), ("seed", 0)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MiningError(f"--{name} must be an integer >= {minimum}, found {value!r}")
    if self.margin is not None and not np.isfinite(self.margin):
      raise MiningError(f"--margin must be a finite number (or unset), found {self.margin}")
    parse_language_shares(",".join(f"{n}:{s!r}" for n, s in self.language_shares))
    return self


# --- inputs: training examples and the candidate pool -------------------------------------------
@dataclasses.dataclass(frozen=True)
class Pool:
  """Candidate passages: texts with their language, passage name (None: by text) and source uid."""
  texts: list[str]
  languages: list[str]
  names: list[str | None]
  uids: list[str]

  def __len__(self) -> int:
    return len(self.texts)

  def __add__(self, other: "Pool") -> "Pool":
    return Pool(self.texts + other.texts, self.languages + other.languages,
                self.names + other.names, self.uids + other.uids)


def lareqa_inputs(data_dir: str, languages: Sequence[str] = (), with_context: bool = False,
                  heldout: lareqa.HeldoutSplit | None = None
                  ) -> tuple[list[records.ParallelExample], Pool]:
  """Training examples of a LAReQA directory (its train part) and every sentence of its files
  (the train part's), named as the training examples name them."""
  examples = lareqa.training_examples(data_dir, languages or None, with_context, heldout)
  parsed = lareqa.read_part(data_dir, languages or None, heldout, "train")
  candidates = [c for data in parsed.values() for c in data.candidates]
  return examples, Pool([lareqa.candidate_text(c, with_context) for c in candidates],
                        [c.lang for c in candidates], [c.uid for c in candidates],
                        [c.uid for c in candidates])


def jsonl_inputs(path: str) -> tuple[list[records.ParallelExample], Pool]:
  """Training examples of a parallel-examples JSONL file; the pool is their `negative` passages
  (in the language of their entry). Add passages with a pool file (`read_pool_file`)."""
  examples = records.read_jsonl(path)
  texts, languages, names, uids = [], [], [], []
  for example in examples:
    for lang, entry in example.languages.items():
      if entry.negative is not None:
        texts.append(entry.negative)
        languages.append(lang)
        names.append(entry.negative_id)
        uids.append(f"{example.id}/{lang}/negative")
  return examples, Pool(texts, languages, names, uids)


def read_pool_file(path: str) -> Pool:
  """Extra candidate passages, one JSON object per line: {"id": str, "lang": str, "text": str}.
  The id is the passage's name (passages with equal ids are one passage)."""
  if not os.path.isfile(path):
    raise MiningError(f"--pool={path!r} does not exist; expected a JSONL file of "
                      '{"id": ..., "lang": ..., "text": ...} passages')
  texts, languages, names = [], [], []
  with open(path, encoding="utf-8-sig") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        passage = json.loads(line)
      except json.JSONDecodeError as e:
        raise MiningError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
      if not isinstance(passage, dict) or sorted(passage) != ["id", "lang", "text"]:
        found = sorted(passage) if isinstance(passage, dict) else type(passage).__name__
        raise MiningError(f"{where}: expected exactly the fields id, lang, text; found {found}")
      for key in ("id", "lang", "text"):
        if not isinstance(passage[key], str) or not passage[key].strip():
          raise MiningError(f"{where}: field {key!r} must be a non-empty string, found "
                            f"{passage[key]!r:.80}")
      texts.append(passage["text"])
      languages.append(passage["lang"])
      names.append(passage["id"])
  if not texts:
    raise MiningError(f"--pool={path!r} holds no passages")
  return Pool(texts, languages, names, list(names))


# --- slots and their policies -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Slots:
  """The S negative slots of a corpus, in (row, positive language, query language) order."""
  row: np.ndarray  # [S] corpus row (question id)
  passage_lang: np.ndarray  # [S] corpus language index of the positive (Y)
  query_lang: np.ndarray  # [S] corpus language index of the query (X)
  policy: np.ndarray  # [S] index into POLICIES

  def __len__(self) -> int:
    return len(self.row)


def exact_counts(shares: Sequence[float], total: int) -> np.ndarray:
  """Integer counts summing to `total`, proportional to `shares` (largest remainder; ties to the
  earlier share)."""
  raw = np.asarray(shares, np.float64) * total
  counts = np.floor(raw).astype(np.int64)
  order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
  for i in order[:total - int(counts.sum())]:
    counts[i] += 1
  return counts


def make_slots(corpus: records.ParallelCorpus, config: MiningConfig) -> Slots:
  """Every (row, Y, X) with both languages present, each given a policy (exact shares)."""
  presence = corpus.presence
  rows, ys, xs = [], [], []
  for n in range(corpus.num_examples):
    langs = np.flatnonzero(presence[n])
    for y in langs:
      for x in langs:
        rows.append(n)
        ys.append(y)
        xs.append(x)
  total = len(rows)
  names = [name for name, _ in config.language_shares]
  counts = exact_counts([share for _, share in config.language_shares], total)
  policy_of_position = np.repeat([POLICIES.index(n) for n in names], counts)
  permutation = np.random.default_rng([config.seed, 0]).permutation(total)
  policy = np.empty(total, np.int64)
  policy[permutation] = policy_of_position
  return Slots(np.asarray(rows, np.int64), np.asarray(ys, np.int64), np.asarray(xs, np.int64),
               policy)


# --- mining -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MiningResult:
  """The slots, the pool, and per slot the chosen pool passage (-1: none eligible)."""
  corpus: records.ParallelCorpus
  pool: Pool
  slots: Slots
  negative: np.ndarray  # [S] pool index or -1
  rank: np.ndarray  # [S] 1-based rank in the slot's language-filtered pool list (0: none)
  score: np.ndarray  # [S] float32 score of the negative against the query (nan: none)
  positive_score: np.ndarray  # [S] float32 the margin's positive score for the chosen negative
  pool_passage_id: np.ndarray  # [P] int passage id of each pool passage
  gold_passage: np.ndarray  # [P] bool: a gold passage of some training question (never taken)
  row_passages: list[frozenset[int]]  # [N] passage ids of each row's positives, all languages
  seconds: dict[str, float]

  @property
  def dropped_cells(self) -> np.ndarray:
    """[N, K] bool: cells (id, Y) whose own slot (X = Y) found no eligible negative. They are
    left out of the output (with the negatives other cells hold for queries in Y), so that the
    mined file trains with data.hard_negatives=True, which needs a `negative` in every cell."""
    dropped = np.zeros(self.corpus.presence.shape, bool)
    own = (self.slots.query_lang == self.slots.passage_lang) & (self.negative < 0)
    dropped[self.slots.row[own], self.slots.passage_lang[own]] = True
    return dropped

  def examples(self) -> list[tuple[records.ParallelExample, dict]]:
    """(example, meta) per corpus row with a cell left: the corpus's queries and positives with
    the mined negatives (X = Y -> `negative`; a slot without one is left out; dropped_cells)."""
    c, s, pool = self.corpus, self.slots, self.pool
    by_cell: dict[tuple[int, int], dict] = collections.defaultdict(dict)
    for i in range(len(s)):
      by_cell[int(s.row[i]), int(s.passage_lang[i])][int(s.query_lang[i])] = i
    kept = c.presence & ~self.dropped_cells
    out = []
    for n in range(c.num_examples):
      languages, meta = {}, {}
      for y in np.flatnonzero(kept[n]):
        own, by_query, provenance = None, {}, {}
        for x, i in sorted(by_cell[n, int(y)].items()):
          if self.negative[i] < 0 or not kept[n, x]:
            continue
          p = int(self.negative[i])
          negative = records.Negative(pool.texts[p], pool.names[p])
          if x == y:
            own = negative
          else:
            by_query[c.languages[x]] = negative
          provenance[c.languages[x]] = {
              "policy": POLICIES[s.policy[i]], "language": pool.languages[p],
              "rank": int(self.rank[i]), "score": round(float(self.score[i]), 6),
              "positive_score": round(float(self.positive_score[i]), 6), "source": pool.uids[p]}
        lang = c.languages[y]
        languages[lang] = records.LanguageTexts(
            c.queries[n, y], c.positives[n, y], own.text if own else None,
            c.positive_ids[n, y] if c.positive_ids is not None else None,
            own.id if own else None, by_query)
        meta[lang] = provenance
      if languages:
        out.append((records.ParallelExample(c.ids[n], languages), {"mined": meta}))
    return out

  def summary(self) -> dict:
    """Counts of the run: slots, per policy and negative language, misses, ranks, timings."""
    found = self.negative >= 0
    languages = collections.Counter(self.pool.languages[p] for p in self.negative[found])
    return {
        "ids": self.corpus.num_examples, "slots": len(self.slots),
        "slots_per_policy": {POLICIES[p]: int(np.sum(self.slots.policy == p))
                             for p in range(len(POLICIES)) if np.any(self.slots.policy == p)},
        "negatives": int(found.sum()), "slots_without_negative": int((~found).sum()),
        "cells_dropped": int(self.dropped_cells.sum()),
        "negatives_per_language": dict(sorted(languages.items())),
        "cross_language_negatives": int(sum(
            self.pool.languages[self.negative[i]] != self.corpus.languages[self.slots.query_lang[i]]
            for i in np.flatnonzero(found))),
        "pool": len(self.pool), "pool_gold_excluded": int(self.gold_passage.sum()),
        "mean_rank": float(self.rank[found].mean()) if found.any() else None,
        "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
    }


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def mine(corpus: records.ParallelCorpus, pool: Pool, embed_queries: EmbedFn,
         embed_passages: EmbedFn, config: MiningConfig, *, query_prefix: str = "",
         passage_prefix: str = "", log: Callable[[str], None] = _log) -> MiningResult:
  """Mines a negative for every slot of `corpus` from `pool` (see the module docstring)."""
  config.validate()
  seconds = {}
  started = time.time()
  # Passage identity over the training data and the pool together: a pool passage is gold when it
  # is (by name or text) the positive of some training row.
  ids = passage_ids.resolve(corpus, list(zip(pool.texts, pool.names)))
  gold_ids = set(ids.positive[ids.positive >= 0].tolist())
  gold = np.isin(ids.extra, list(gold_ids)) if len(pool) else np.zeros(0, bool)
  allowed = ~gold
  if not allowed.any():
    raise MiningError(
        f"the pool of {len(pool)} candidate passages holds only gold passages of training "
        "questions, which are never mined as negatives. Add passages with --pool=FILE.jsonl "
        "(LAReQA directories bring their non-answer sentences).")
  row_passages = [frozenset(ids.positive[n][ids.positive[n] >= 0].tolist())
                  for n in range(corpus.num_examples)]
  slots = make_slots(corpus, config)
  log(f"mining {len(slots)} slots of {corpus.num_examples} ids in {len(corpus.languages)} "
      f"languages; pool {len(pool)} passages, {int(gold.sum())} gold ones excluded")

  # 1. Embeddings: every query and positive cell, and the allowed pool passages.
  cells = np.argwhere(corpus.presence)  # [C, 2] (row, language)
  cell_index = np.full(corpus.presence.shape, -1, np.int64)
  cell_index[cells[:, 0], cells[:, 1]] = np.arange(len(cells))
  query_emb = embed_queries([corpus.queries[n, k] for n, k in cells], query_prefix)
  positive_emb = embed_passages([corpus.positives[n, k] for n, k in cells], passage_prefix)
  allowed_index = np.flatnonzero(allowed)
  pool_emb = np.zeros((len(pool), query_emb.shape[1]), np.float32)
  pool_emb[allowed_index] = embed_passages([pool.texts[i] for i in allowed_index], passage_prefix)
  seconds["embed"] = time.time() - started

  # 2. Per slot: the query cell, the positive's score, the language its negative must have.
  query_cell = cell_index[slots.row, slots.query_lang]
  positive_cell = cell_index[slots.row, slots.passage_lang]
  slot_positive_score = np.einsum("sd,sd->s", query_emb[query_cell], positive_emb[positive_cell])
  # The margin's reference per pool language: the question's positive in that language.
  pool_language_names = sorted(set(pool.languages))
  pool_language = np.asarray([pool_language_names.index(lang) for lang in pool.languages])
  pool_language_of = np.asarray([pool_language_names.index(lang) if lang in pool_language_names
                                 else -1 for lang in corpus.languages])

  def margin_reference(i: int) -> np.ndarray:
    reference = np.full(len(pool_language_names), slot_positive_score[i], np.float32)
    n = slots.row[i]
    for k in np.flatnonzero(corpus.presence[n]):
      if pool_language_of[k] >= 0:
        reference[pool_language_of[k]] = query_emb[query_cell[i]] @ positive_emb[cell_index[n, k]]
    return reference
  target = np.where(slots.policy == POLICIES.index("query"), slots.query_lang,
                    np.where(slots.policy == POLICIES.index("positive"), slots.passage_lang,
                             ANY_LANGUAGE))
  pool_languages = np.asarray(pool.languages)
  uniform = np.random.default_rng([config.seed, 1]).random(len(slots))

  negative = np.full(len(slots), -1, np.int64)
  rank = np.zeros(len(slots), np.int64)
  score = np.full(len(slots), np.nan, np.float32)
  positive_score = slot_positive_score.astype(np.float32)
  search_started = time.time()
  for t in np.unique(target):
    language = corpus.languages[t] if t >= 0 else None
    mask = allowed if language is None else allowed & (pool_languages == language)
    members = np.flatnonzero(target == t)
    available = int(mask.sum())
    if available == 0:
      log(f"  no allowed pool passage in {language}: {len(members)} slots stay without a negative")
      continue
    depth = min(config.depth, available)
    pending = members
    while len(pending):
      queries = np.unique(query_cell[pending])
      result = topk.search_with_ranks(
          query_emb[queries], pool_emb, depth, corpus_mask=mask,
          progress_desc=f"searching {len(queries)} queries over {available} passages "
          f"({language or 'any language'}, top {depth})" if available * len(queries) > 1e8
          else None)
      row_of = {int(q): i for i, q in enumerate(queries)}
      retry = []
      complete = depth == available  # the whole language pool is in the list
      for i in pending:
        r = row_of[int(query_cell[i])]
        reference = margin_reference(i)
        chosen = _choose(result.indices[r], result.scores[r], reference, pool_language,
                         ids.extra, row_passages[slots.row[i]], config, uniform[i], complete)
        if chosen is not None:
          negative[i], rank[i], score[i] = chosen
          positive_score[i] = reference[pool_language[negative[i]]]
        elif not complete:
          retry.append(i)
      pending = np.asarray(retry, np.int64)
      if len(pending):
        depth = min(2 * depth, available)
        log(f"  {len(pending)} slots ({language or 'any language'}) with too few eligible "
            f"candidates: searching again at depth {depth}")
  seconds["search"] = time.time() - search_started
  seconds["total"] = time.time() - started
  return MiningResult(corpus, pool, slots, negative, rank, score, positive_score, ids.extra, gold,
                      row_passages, seconds)


def _choose(indices: np.ndarray, scores: np.ndarray, reference: np.ndarray,
            pool_language: np.ndarray, pool_passage_id: np.ndarray, own_passages: frozenset[int],
            config: MiningConfig, uniform: float, complete: bool) -> tuple[int, int, float] | None:
  """(pool index, rank, score) of the slot's negative among its ranked candidates, or None when
  fewer than sample_top are eligible: a deeper search may find more; in a `complete` list (the
  whole language pool) the pick is among the eligible ones there are (None: there are none).
  reference: the margin's positive score per pool language (pool_language: [P] its index)."""
  eligible = []
  for position, (index, value) in enumerate(zip(indices, scores)):
    if position < config.skip_top:
      continue
    if config.margin is not None and value > reference[pool_language[index]] - config.margin:
      continue
    if int(pool_passage_id[index]) in own_passages:
      continue  # a passage of the same question id, in any language: never a negative
    eligible.append((int(index), position + 1, float(value)))
    if len(eligible) == config.sample_top:
      break
  if not eligible or (len(eligible) < config.sample_top and not complete):
    return None
  return eligible[int(uniform * len(eligible))]


def write(path: str, result: MiningResult) -> int:
  """Writes the mined training JSONL (atomically: a temporary file, then renamed)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temporary = f"{path}.tmp-{os.getpid()}"
  count = 0
  with open(temporary, "w", encoding="utf-8") as f:
    for example, meta in result.examples():
      f.write(json.dumps({**example.to_json(), "meta": meta}, ensure_ascii=False) + "\n")
      count += 1
  os.replace(temporary, path)
  return count


# --- the command line's run ---------------------------------------------------------------------
@dataclasses.dataclass
class MineOptions:
  """Everything `python -m hybrid_jax.mine` needs (its flags, minus parsing)."""
  data: str = ""  # LAReQA directory (one <lang>.json per language) or parallel-examples JSONL
  out: str = ""
  model: str = ""  # Hugging Face model directory, or
  workdir: str = ""  # a training run (checkpoint `step`)
  step: str = "best"
  languages: Sequence[str] = ()
  passage_with_context: bool = False
  heldout_fraction: float = -1.0  # -1: the run's (when it trained on this LAReQA data), else 0
  heldout_unit: str = ""
  heldout_seed: int = -1
  pool: str = ""  # optional JSONL of extra candidate passages
  config: MiningConfig = dataclasses.field(default_factory=MiningConfig)
  query_prefix: str | None = None  # None: the run's config.data prefixes (--workdir)
  passage_prefix: str | None = None
  query_max_length: int = 64
  passage_max_length: int = 0  # 0: 128, or 512 with passage_with_context
  batch_size: int = 128
  dtype: str = "float32"


def _run_data_config(opts: MineOptions) -> dict:
  if not opts.workdir:
    return {}
  from hybrid_jax import checkpointing  # pylint: disable=g-import-not-at-top
  return dict(checkpointing.read_run_config(opts.workdir).get("data") or {})


def _prefixes(opts: MineOptions) -> tuple[str, str]:
  run = _run_data_config(opts)
  query = opts.query_prefix if opts.query_prefix is not None else run.get("query_prefix")
  passage = opts.passage_prefix if opts.passage_prefix is not None else run.get("passage_prefix")
  if query is None or passage is None:
    raise MiningError(
        "the input prefixes are unknown: pass --query_prefix and --passage_prefix (the model's "
        "own: multilingual-e5 'query: ' / 'passage: ', the paper's models 'Query: ' / "
        "'Passage: '); with --workdir they default to the run's config.data prefixes")
  return query, passage


def _heldout(opts: MineOptions, path: str) -> lareqa.HeldoutSplit:
  """The flags' held-out split, else the run's when it trained on this LAReQA directory (so a
  run's held-out test articles are never mined from), else none."""
  run = _run_data_config(opts)
  same_data = run.get("source") == "lareqa" and os.path.basename(os.path.normpath(
      str(run.get("path", "")))) == os.path.basename(os.path.normpath(path))
  run = run if same_data else {}
  if opts.heldout_fraction < 0 and not run:
    # Mining every question silently would put the test articles' questions and sentences into
    # training data that records no split, so a later --part=test evaluation would score them.
    raise MiningError(
        f"--data={opts.data!r} is a LAReQA directory and no held-out split is known: pass "
        "--heldout_fraction=F (the fraction you will evaluate on with --part=test, e.g. 0.2 as "
        "in experiments/study_config.py; 0 mines every question, test ones included), or "
        "--workdir of a run trained on this directory to use its split")
  return lareqa.HeldoutSplit(
      opts.heldout_fraction if opts.heldout_fraction >= 0 else float(
          run.get("heldout_fraction", 0.0)),
      opts.heldout_unit or str(run.get("heldout_unit", "article")),
      opts.heldout_seed if opts.heldout_seed >= 0 else int(run.get("heldout_seed", 0))).validate(
          "--heldout")


def load_inputs(opts: MineOptions) -> tuple[records.ParallelCorpus, Pool, str]:
  """(training corpus, candidate pool, description) of --data (and --pool)."""
  from hybrid_jax.data import sources  # pylint: disable=g-import-not-at-top
  path = sources.resolve_path(opts.data)
  if not path or not os.path.exists(path):
    raise MiningError(f"--data={opts.data!r} does not exist; expected a LAReQA directory (one "
                      "<lang>.json per language, e.g. mlqa-r under $HYBRID_JAX_DATA) or a "
                      "parallel-examples JSONL file")
  if os.path.isdir(path):
    heldout = _heldout(opts, path)
    examples, pool = lareqa_inputs(path, tuple(opts.languages), opts.passage_with_context,
                                   heldout)
    description = f"LAReQA {path}" + (f" (train part, {heldout.fraction:g} held out by "
                                      f"{heldout.unit})" if heldout.fraction else "")
  else:
    if opts.passage_with_context or opts.heldout_fraction > 0:
      raise MiningError("--passage_with_context and --heldout_fraction apply to LAReQA "
                        f"directories; --data={opts.data!r} is a JSONL file")
    examples, pool = jsonl_inputs(path)
    description = f"JSONL {path}"
  if opts.pool:
    pool = pool + read_pool_file(opts.pool)
  corpus = records.ParallelCorpus.from_examples(examples, tuple(opts.languages) or None,
                                                source=path)
  if opts.languages:  # the pool in the selected languages only
    keep = [i for i, lang in enumerate(pool.languages) if lang in corpus.languages]
    pool = Pool(*([getattr(pool, f.name)[i] for i in keep] for f in dataclasses.fields(Pool)))
  return corpus, pool, description


def _require_one_model(opts: MineOptions) -> None:
  if bool(opts.model) == bool(opts.workdir):
    raise MiningError("pass exactly one of --model=HF_DIR (a Hugging Face model directory) and "
                      "--workdir=RUN (a training run's checkpoint)")


def embed_fns(opts: MineOptions) -> tuple[EmbedFn, EmbedFn, str]:
  """(embed_queries, embed_passages, description) of --model or --workdir, with progress."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import inference  # pylint: disable=g-import-not-at-top
  _require_one_model(opts)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(opts.dtype)
  if dtype is None:
    raise MiningError(f"--dtype={opts.dtype!r}; expected float32 or bfloat16")
  passage_length = opts.passage_max_length or (512 if opts.passage_with_context else 128)
  if opts.model:
    if not os.path.isdir(opts.model):
      raise MiningError(f"--model={opts.model!r} is not a directory; expected a Hugging Face "
                        "model directory (config.json, weights, tokenizer.json)")
    query_embedder = inference.TextEmbedder.from_pretrained(
        opts.model, batch_size=opts.batch_size, max_length=opts.query_max_length, dtype=dtype)
    description = f"model {opts.model}"
  else:
    from hybrid_jax import checkpointing  # pylint: disable=g-import-not-at-top
    loaded = checkpointing.load_params(opts.workdir, opts.step)
    query_embedder = inference.TextEmbedder.from_params(
        loaded, batch_size=opts.batch_size, max_length=opts.query_max_length, dtype=dtype)
    description = f"workdir {opts.workdir} step {loaded.step}"
  passage_embedder = inference.TextEmbedder(
      query_embedder.config, query_embedder.params, query_embedder.tokenizer,
      batch_size=opts.batch_size, max_length=passage_length, dtype=dtype)
  embed_queries, embed_passages = inference.embed_fns(query_embedder, passage_embedder,
                                                      show_progress=True)
  return embed_queries, embed_passages, description


def run(opts: MineOptions, log: Callable[[str], None] = _log) -> dict:
  """Mines --data with the model and writes --out (+ --out.summary.json); returns the summary."""
  if not opts.out:
    raise MiningError("--out=FILE.jsonl is required (the mined training data)")
  if not opts.data:
    raise MiningError("--data is required: a LAReQA directory or a parallel-examples JSONL file")
  _require_one_model(opts)
  opts.config.validate()
  query_prefix, passage_prefix = _prefixes(opts)
  corpus, pool, description = load_inputs(opts)
  embed_queries, embed_passages, model = embed_fns(opts)
  log(f"{description}: {corpus.num_examples} ids, languages {' '.join(corpus.languages)}; {model}")
  result = mine(corpus, pool, embed_queries, embed_passages, opts.config,
                query_prefix=query_prefix, passage_prefix=passage_prefix, log=log)
  count = write(opts.out, result)
  summary = {"data": description, "model": model, "out": opts.out, "records": count,
             "query_prefix": query_prefix, "passage_prefix": passage_prefix,
             "config": {**dataclasses.asdict(opts.config),
                        "language_shares": dict(opts.config.language_shares)},
             **result.summary()}
  with open(f"{opts.out}.summary.json", "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, ensure_ascii=False)
  log(f"wrote {count} records with {summary['negatives']} mined negatives to {opts.out} "
      f"({summary['slots_without_negative']} slots without one; summary in "
      f"{opts.out}.summary.json) in {summary['seconds']['total']:.0f}s")
  if summary["slots_without_negative"]:
    log(f"warning: {summary['slots_without_negative']} slots found no eligible negative: a "
        "cross-lingual row without one uses its cell's 'negative'; "
        f"{summary['cells_dropped']} cells whose own slot found none are left out. Lower "
        "--margin or --skip_top to keep them")
  return summary
