"""search.store: shards written once, resumed after an interruption, checked when opened."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hybrid_jax.search import store as store_lib


def _docs(n: int, text_suffix: str = ""):
  return [(f"d{i}", f"text {i}{text_suffix}") for i in range(n)]


class FakeEmbedder:
  """texts -> [n, 4] embeddings that are a function of the text; records every call's size."""

  def __init__(self, fail_on_call: int | None = None):
    self.calls: list[int] = []
    self.fail_on_call = fail_on_call

  def __call__(self, texts):
    if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
      raise KeyboardInterrupt("simulated preemption")
    self.calls.append(len(texts))
    return np.array([[len(t), sum(map(ord, t)) % 97, 1.0, float(t.endswith("x"))]
                     for t in texts], np.float32)


def test_store_roundtrip_and_row_access(tmp_path):
  embed = FakeEmbedder()
  store = store_lib.write_store(str(tmp_path), _docs(23), embed, key={"model": "m"},
                                shard_size=5, desc=None)
  assert embed.calls == [5, 5, 5, 5, 3]
  want = embed([t for _, t in _docs(23)])
  assert store.shape == (23, 4) and store.ids == [f"d{i}" for i in range(23)]
  np.testing.assert_array_equal(np.asarray(store), want)
  np.testing.assert_array_equal(store[3:12], want[3:12])  # across three shards
  rows = np.array([[22, 0], [7, 7]])
  np.testing.assert_array_equal(store[rows], want[rows])
  assert store.memory_mapped
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  assert [s["rows"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
  assert (manifest["dim"], manifest["dtype"], manifest["key"]) == (4, "float32", {"model": "m"})


def test_interrupted_embedding_resumes_from_last_complete_shard(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    store_lib.write_store(str(tmp_path), _docs(23), FakeEmbedder(fail_on_call=3),
                          key={"model": "m"}, shard_size=5, desc=None)
  with pytest.raises(store_lib.StoreError, match="incomplete .*3 shards written"):
    store_lib.open_store(str(tmp_path))
  resumed = FakeEmbedder()
  store = store_lib.write_store(str(tmp_path), _docs(23), resumed, key={"model": "m"},
                                shard_size=5, desc=None)
  assert resumed.calls == [5, 3]  # shards 0-2 kept, only 3 and 4 embedded
  np.testing.assert_array_equal(np.asarray(store), FakeEmbedder()([t for _, t in _docs(23)]))
  again = FakeEmbedder()
  store_lib.write_store(str(tmp_path), _docs(23), again, key={"model": "m"}, shard_size=5,
                        desc=None)
  assert again.calls == []  # complete and unchanged: nothing to embed


def test_changed_texts_key_or_size_re_embed_what_changed(tmp_path):
  store_lib.write_store(str(tmp_path), _docs(12), FakeEmbedder(), key={"model": "m"},
                        shard_size=5, desc=None)
  edited = _docs(12)
  edited[7] = ("d7", "text 7 edited x")
  embed = FakeEmbedder()
  store = store_lib.write_store(str(tmp_path), edited, embed, key={"model": "m"}, shard_size=5,
                                desc=None)
  assert embed.calls == [5, 2]  # shard 0 kept; the edited shard 1 and everything after redone
  assert store[7][3] == 1.0
  embed = FakeEmbedder()
  store_lib.write_store(str(tmp_path), edited[:9], embed, key={"model": "m"}, shard_size=5,
                        desc=None)
  assert embed.calls == [4] and not (tmp_path / "shard-00002.npy").exists()  # shrank
  embed = FakeEmbedder()
  store_lib.write_store(str(tmp_path), edited[:9], embed, key={"model": "other"}, shard_size=5,
                        desc=None)
  assert embed.calls == [5, 4]  # another model: everything


def test_open_store_errors_are_clear(tmp_path):
  with pytest.raises(store_lib.StoreError, match="not a corpus embedding store"):
    store_lib.open_store(str(tmp_path))
  store_lib.write_store(str(tmp_path), _docs(12), FakeEmbedder(), key={"model": "m"},
                        shard_size=5, desc=None)
  ids_file = tmp_path / "shard-00001.ids.txt"
  good_ids = ids_file.read_text()
  ids_file.write_text("d5\nd6\nd7\nd8\n")  # one id short of the shard's 5 rows
  with pytest.raises(store_lib.StoreError,
                     match=r"shard-00001 .*5 embedding rows, 4 ids in shard-00001\.ids\.txt"):
    store_lib.open_store(str(tmp_path))
  ids_file.write_text(good_ids)
  np.save(tmp_path / "shard-00002.npy", np.zeros((2, 3), np.float32))
  with pytest.raises(store_lib.StoreError, match=r"shape \(2, 3\), but the store's dim is 4"):
    store_lib.open_store(str(tmp_path))
  os.remove(tmp_path / "shard-00002.npy")
  with pytest.raises(store_lib.StoreError, match=r"shard-00002\.npy is missing"):
    store_lib.open_store(str(tmp_path))
  ids_file.write_text("d5\nd6\nd7\nd8\nd10\n")
  with pytest.raises(store_lib.StoreError, match=r"ids differ from the ones recorded"):
    store_lib.open_store(str(tmp_path))


def test_repeated_ids_are_refused(tmp_path):
  docs = _docs(8) + [("d2", "again")]
  with pytest.raises(store_lib.StoreError, match=r"id 'd2' appears more than once \(shard "
                                                 r"shard-00002\)"):
    store_lib.write_store(str(tmp_path), docs, FakeEmbedder(), key={}, shard_size=4, desc=None)


def test_float16_and_normalized(tmp_path):
  store = store_lib.write_store(str(tmp_path), _docs(7), FakeEmbedder(), key={}, shard_size=4,
                                dtype="float16", normalize=True, desc=None)
  rows = np.asarray(store)
  assert rows.dtype == np.float16
  np.testing.assert_allclose(np.linalg.norm(rows.astype(np.float32), axis=1), 1.0, atol=2e-3)
