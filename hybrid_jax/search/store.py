"""Corpus embeddings on disk, in shards, written once (with resume) and searched many times.

Why: a MIRACL / BEIR-NQ corpus has millions of passages; embedding it takes hours, may be
interrupted (preemptible TPUs, SIGTERM), and the result is searched by many evaluations. So the
corpus is embedded shard by shard (`shard_size` passages each) into one directory:

    manifest.json            key (model, prefixes, lengths...), dim, dtype, shard size, shards
    shard-00000.npy          [rows, dim] embeddings of passages 0 .. shard_size-1
    shard-00000.ids.txt      their ids, one per line, in row order
    ...

Each shard's two files are written to temporary names and renamed, then the manifest is rewritten
(also atomically) to list it, so a shard is complete exactly when the manifest lists it: an
interrupted run leaves only complete shards behind (plus perhaps a stray temporary file, which is
overwritten). `write_store` on the same directory with the same key resumes after the last
complete shard that still matches the corpus (its ids and a digest of its texts are checked, so
an edited corpus re-embeds from the first changed shard); another key starts over.

`open_store` checks the directory before anything is searched: every listed shard present, row
counts equal to its ids file and to the manifest, one embedding width, no id twice. It returns a
`ShardedEmbeddings`, a read-only [N, dim] view over the shards (memory-mapped by default) that
`search.topk` reads chunk by chunk, so searching needs no copy of the whole corpus in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from hybrid_jax import errors
from hybrid_jax.eval import embeddings_io

MANIFEST = "manifest.json"
FORMAT = "hybrid_jax.corpus_store/1"
DTYPES = ("float32", "float16")
DEFAULT_SHARD_SIZE = 100_000


class StoreError(errors.UserError):
  """An embedding store is missing, damaged or does not match the corpus it is used for."""


@dataclasses.dataclass(frozen=True)
class Shard:
  """One complete shard as the manifest lists it."""
  name: str  # file stem: <name>.npy and <name>.ids.txt
  rows: int
  ids_sha1: str  # digest of its ids (one per line)
  texts_sha1: str  # digest of the (prefixed) texts it embeds

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _shard_name(i: int) -> str:
  return f"shard-{i:05d}"


def _digest(items: Sequence[str]) -> str:
  digest = hashlib.sha1()
  for item in items:
    digest.update(item.encode("utf-8") + b"\n")
  return digest.hexdigest()


def _json_normal(value) -> object:
  """The value as it reads back from JSON (tuples become lists), for comparing keys."""
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


def _save_manifest(directory: str, manifest: dict) -> None:
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
  _write_atomically(os.path.join(directory, MANIFEST), write)


def read_manifest(directory: str) -> dict | None:
  """The manifest of a store directory, or None when there is none (or it is unreadable)."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


# --- reading --------------------------------------------------------------------------------------
class ShardedEmbeddings:
  """Read-only [N, dim] rows over a store's shards; rows are read only when indexed.

  Supports `x[a:b]` (contiguous rows), `x[int_array]` (gathered rows) and `np.asarray(x)`.
  """

  def __init__(self, directory: str, manifest: dict, arrays: list[np.ndarray], ids: list[str]):
    self.directory = directory
    self.manifest = manifest
    self.ids = ids
    self._arrays = arrays
    self._starts = np.cumsum([0] + [len(a) for a in arrays])
    self.dtype = np.dtype(manifest["dtype"])
    self.shape = (int(self._starts[-1]), int(manifest["dim"]))
    self.ndim = 2

  @property
  def memory_mapped(self) -> bool:
    return all(isinstance(a, np.memmap) for a in self._arrays)

  @property
  def key(self) -> dict:
    return self.manifest["key"]

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, slice):
      start, stop, step = index.indices(self.shape[0])
      if step != 1:
        return self[np.arange(start, stop, step)]
      pieces = []
      for i, array in enumerate(self._arrays):
        lo, hi = max(start, self._starts[i]), min(stop, self._starts[i + 1])
        if lo < hi:
          pieces.append(np.asarray(array[lo - self._starts[i]:hi - self._starts[i]]))
      if not pieces:
        return np.zeros((0, self.shape[1]), self.dtype)
      return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    index = np.asarray(index)
    if index.ndim == 0:
      return self[int(index):int(index) + 1][0]
    flat = index.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
      raise IndexError(f"row index out of range [0, {self.shape[0]})")
    out = np.empty((flat.size, self.shape[1]), self.dtype)
    shard_of = np.searchsorted(self._starts, flat, side="right") - 1
    for i in np.unique(shard_of):
      where = np.flatnonzero(shard_of == i)
      local = flat[where] - self._starts[i]
      order = np.argsort(local, kind="stable")  # sorted reads are friendlier to a memory map
      out[where[order]] = self._arrays[i][local[order]]
    return out.reshape(index.shape + (self.shape[1],))

  def __array__(self, dtype=None, copy=None):
    whole = self[0:self.shape[0]]
    return whole if dtype is None else whole.astype(dtype)


def _read_ids(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    ids = f.read().split("\n")
  if ids and ids[-1] == "":
    ids.pop()
  return ids


def open_store(directory: str, *, mmap: bool = True) -> ShardedEmbeddings:
  """The store's embeddings, checked shard by shard against the manifest and the ids files."""
  manifest = read_manifest(directory)
  if manifest is None:
    found = sorted(os.listdir(directory))[:8] if os.path.isdir(directory) else "no directory"
    raise StoreError(
        f"{directory} is not a corpus embedding store: expected {MANIFEST} (format {FORMAT}), "
        f"found {found}. Write one with the evaluator (--corpus_store) or "
        "search.store.write_store.")
  if not manifest.get("complete"):
    raise StoreError(
        f"{directory}: the store is incomplete ({len(manifest.get('shards', []))} shards written "
        "so far); run the same evaluation again to resume embedding from the last complete shard.")
  arrays, ids, seen = [], [], set()
  dim = int(manifest["dim"])
  for entry in manifest["shards"]:
    shard = Shard(**entry)
    npy_path = os.path.join(directory, shard.name + ".npy")
    ids_path = os.path.join(directory, shard.name + ".ids.txt")
    for path in (npy_path, ids_path):
      if not os.path.isfile(path):
        raise StoreError(f"{path} is missing but {MANIFEST} lists shard {shard.name}; the store "
                         "was damaged: delete the directory and embed the corpus again.")
    try:
      array = np.load(npy_path, mmap_mode="r" if mmap else None, allow_pickle=False)
      shard_ids = _read_ids(ids_path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
      raise StoreError(f"cannot read shard {shard.name} of {directory}: {e}") from e
    if array.ndim != 2 or array.shape[1] != dim:
      raise StoreError(f"{npy_path}: embeddings of shape {array.shape}, but the store's dim is "
                       f"{dim}; every shard must come from the same model. Re-embed the corpus.")
    if len(shard_ids) != len(array) or len(array) != shard.rows:
      raise StoreError(
          f"shard {shard.name} of {directory}: {len(array)} embedding rows, {len(shard_ids)} ids "
          f"in {os.path.basename(ids_path)} and {shard.rows} rows in {MANIFEST}; they must agree "
          "(one id per row). Delete the shard's files and its manifest entry, or the whole store, "
          "and embed again.")
    if _digest(shard_ids) != shard.ids_sha1:
      raise StoreError(f"{ids_path}: ids differ from the ones recorded in {MANIFEST}; the file "
                       "was edited after it was written. Re-embed the corpus.")
    for doc_id in shard_ids:
      if doc_id in seen:
        raise StoreError(f"{directory}: id {doc_id!r} appears more than once (shard "
                         f"{shard.name}); document ids must be unique in a corpus.")
      seen.add(doc_id)
    arrays.append(array)
    ids.extend(shard_ids)
  return ShardedEmbeddings(directory, manifest, arrays, ids)


# --- writing --------------------------------------------------------------------------------------
def _batches(docs: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
  batch = []
  for doc in docs:
    batch.append(doc)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


class _EmbedProgress:
  """Passages embedded (this run) and reused, rate and ETA on stderr, after each shard."""

  def __init__(self, desc: str | None, total: int | None):
    self.desc, self.total = desc, total
    self.start = time.time()
    self.embedded = self.reused = 0

  def update(self, rows: int, reused: bool) -> None:
    if reused:
      self.reused += rows
    else:
      self.embedded += rows
    if not self.desc:
      return
    elapsed = time.time() - self.start
    rate = self.embedded / max(elapsed, 1e-9)
    done = self.embedded + self.reused
    eta = f", ETA {(self.total - done) / rate:.0f}s" if self.total and rate > 0 else ""
    print(f"{self.desc}: {done}/{self.total or '?'} passages ({self.reused} reused from earlier "
          f"runs), {rate:.1f}/s, elapsed {elapsed:.0f}s{eta}", file=sys.stderr, flush=True)


def _remove_shard_files(directory: str, names: Iterable[str]) -> None:
  for name in names:
    for suffix in (".npy", ".ids.txt"):
      path = os.path.join(directory, name + suffix)
      if os.path.exists(path):
        os.remove(path)


def write_store(directory: str, docs: Iterable[tuple[str, str]],
                embed_fn: Callable[[list[str]], np.ndarray], *, key: Mapping,
                shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "float32",
                num_docs: int | None = None, normalize: bool = False,
                desc: str | None = "embedding corpus") -> ShardedEmbeddings:
  """Embeds `docs` ((id, text) pairs, in corpus order) into `directory`, resuming if possible.

  Args:
    docs: the corpus, streamed (texts as they are embedded: prefixes already applied).
    embed_fn: texts -> [n, dim] float embeddings.
    key: identifies the embedding model and settings; a store with another key is replaced.
    shard_size: passages per shard (the unit of resume).
    dtype: "float32" or "float16" on disk.
    num_docs: the corpus size when known (progress and ETA).
    normalize: L2-normalise rows before storing (what cosine scoring searches).
    desc: label of the progress lines on stderr (None: quiet).
  """
  if dtype not in DTYPES:
    raise StoreError(f"store dtype {dtype!r}: expected one of {DTYPES}")
  if int(shard_size) < 1:
    raise StoreError(f"shard_size must be >= 1, found {shard_size}")
  os.makedirs(directory, exist_ok=True)
  settings = {"format": FORMAT, "key": _json_normal(dict(key)), "dtype": dtype,
              "shard_size": int(shard_size), "normalized": bool(normalize)}
  old = read_manifest(directory)
  kept: list[Shard] = []
  if old is not None and all(old.get(k) == v for k, v in settings.items()):
    kept = [Shard(**entry) for entry in old.get("shards", [])]
  elif old is not None:
    # The manifest first: an interruption between the two must not leave a manifest (maybe
    # "complete") that lists deleted shards.
    _save_manifest(directory, {**settings, "dim": None, "shards": [], "complete": False})
    _remove_shard_files(directory, [entry["name"] for entry in old.get("shards", [])])
  manifest = {**settings, "dim": old.get("dim") if kept else None, "shards": [],
              "complete": False}

  progress = _EmbedProgress(desc, num_docs)
  shards: list[Shard] = []
  for i, batch in enumerate(_batches(docs, int(shard_size))):
    ids = [doc_id for doc_id, _ in batch]
    texts = [text for _, text in batch]
    shard = Shard(_shard_name(i), len(batch), _digest(ids), _digest(texts))
    if i < len(kept) and kept[i] == shard and all(
        os.path.isfile(os.path.join(directory, shard.name + suffix))
        for suffix in (".npy", ".ids.txt")):
      shards.append(shard)
      progress.update(shard.rows, reused=True)
      continue
    if i < len(kept):  # the corpus changed from here on: later shards are stale too
      _save_manifest(directory, {**manifest, "shards": [s.to_json() for s in shards]})
      _remove_shard_files(directory, [s.name for s in kept[i:]])
      kept = kept[:i]
    embeddings = np.asarray(embed_fn(texts), np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(batch):
      raise StoreError(f"embed_fn returned shape {embeddings.shape} for {len(batch)} texts; "
                       "expected [num_texts, dim]")
    if manifest["dim"] is not None and embeddings.shape[1] != manifest["dim"]:
      raise StoreError(f"embed_fn returned width {embeddings.shape[1]} but the store holds width "
                       f"{manifest['dim']}; the model changed without its key changing.")
    if not np.isfinite(embeddings).all():
      raise StoreError(f"embed_fn returned NaN or inf embeddings in shard {shard.name}")
    if normalize:
      embeddings = embeddings_io.normalize_rows(embeddings)
    manifest["dim"] = int(embeddings.shape[1])
    stem = os.path.join(directory, shard.name)
    _write_atomically(stem + ".npy", lambda tmp, e=embeddings.astype(dtype): _save_npy(tmp, e))
    _write_atomically(stem + ".ids.txt", lambda tmp, ids=ids: _save_ids(tmp, ids))
    shards.append(shard)
    manifest["shards"] = [s.to_json() for s in shards]
    _save_manifest(directory, manifest)
    progress.update(shard.rows, reused=False)
  if not shards:
    raise StoreError(f"no documents to embed into {directory}: the corpus is empty")
  manifest.update(shards=[s.to_json() for s in shards], complete=True,
                  num_docs=sum(s.rows for s in shards))
  _save_manifest(directory, manifest)
  _remove_shard_files(directory, [s.name for s in kept[len(shards):]])  # the corpus shrank
  return open_store(directory)


def _save_npy(path: str, array: np.ndarray) -> None:
  with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a bare name
    np.save(f, array, allow_pickle=False)


def _save_ids(path: str, ids: Sequence[str]) -> None:
  bad = [i for i in ids if "\n" in i or "\r" in i]
  if bad:
    raise StoreError(f"document id {bad[0]!r} contains a line break; ids are stored one per line")
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(i + "\n" for i in ids))
