"""End to end: `python -m hybrid_jax.evaluate` from embeddings and from a model, on a language subset.

Checks the command line, the results.json schema of DESIGN.md, every report file, the embedding
export/import round trip, the embedding cache and the compare command on the outputs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from hybrid_jax import errors
from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import embeddings_io
from hybrid_jax.eval import runner
from hybrid_jax.eval import significance
from hybrid_jax.models import inference

from eval_helpers import data_dir, write_tiny_model  # tests/eval/eval_helpers.py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LANGS = ["en", "de", "el"]


def _run_cli(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        cwd=REPO, timeout=timeout, check=False)


def topic_embeddings(collection: collection_lib.Collection, noise: float = 0.0, seed: int = 0,
                     extra_dims: int = 8):
  """Oracle embeddings: a query is the one-hot of its question id; a candidate is the normalised
  sum of the one-hots of the ids it answers (random in `extra_dims` private dimensions when it
  answers none). With noise=0 every relevant candidate scores > 0 and every other one 0, so
  mAP = R@1(X->Y) = 1 and in the pool the R relevant candidates take ranks 1..R (rank distance
  R - 1). `noise` adds Gaussian noise of that scale to the queries."""
  rng = np.random.default_rng(seed)
  qid = [u.rsplit("_", 1)[0] for u in collection.query_uids]
  dim_of = {i: d for d, i in enumerate(sorted(set(qid)))}
  dim = len(dim_of) + extra_dims
  queries = np.zeros((collection.num_queries, dim))
  queries[np.arange(len(qid)), [dim_of[i] for i in qid]] = 1.0
  candidates = np.zeros((collection.num_candidates, dim))
  for i, rel in zip(qid, collection.relevant):
    for c, _ in rel:
      candidates[c, dim_of[i]] = 1.0
  lonely = ~candidates.any(axis=1)
  candidates[lonely, len(dim_of):] = rng.normal(size=(int(lonely.sum()), extra_dims))
  candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
  queries += noise * rng.normal(size=queries.shape)
  return queries.astype(np.float32), candidates.astype(np.float32)


def check_results_schema(results: dict, languages: list[str]) -> None:
  """results.json exactly as DESIGN.md ("Evaluation grid") specifies it (extra metrics allowed
  inside entries)."""
  assert list(results) == ["dataset", "languages", "summary", "settings", "multilingual_by_lang"]
  assert isinstance(results["dataset"], str) and results["languages"] == languages
  assert set(results["summary"]) == {"monolingual", "cross_lingual", "multilingual"}
  for key in ("monolingual", "cross_lingual", "multilingual"):
    assert isinstance(results["summary"][key]["map"], float)
  assert isinstance(results["summary"]["multilingual"]["rank_distance"], float)
  assert len(results["settings"]) == len(languages) ** 2
  for entry in results["settings"]:
    assert {"query_lang", "candidate_lang", "map", "recall@1", "recall@10",
            "num_queries"} <= set(entry)
    assert entry["query_lang"] in languages and entry["candidate_lang"] in languages
    assert isinstance(entry["num_queries"], int)
  assert [e["query_lang"] for e in results["multilingual_by_lang"]] == languages
  for entry in results["multilingual_by_lang"]:
    assert {"query_lang", "map", "rank_distance"} <= set(entry)


@pytest.fixture(scope="module")
def subset():
  return collection_lib.from_lareqa(data_dir("xquad-r"), LANGS, name="xquad-r")


@pytest.fixture(scope="module")
def oracle_run(subset, tmp_path_factory):
  """`--embeddings` on the oracle topic embeddings, through the command line."""
  base = tmp_path_factory.mktemp("oracle")
  queries, candidates = topic_embeddings(subset)
  embeddings_io.save(str(base / "emb"), "queries", subset.query_uids, queries)
  embeddings_io.save(str(base / "emb"), "candidates", subset.candidate_uids, candidates)
  out = base / "out"
  result = _run_cli("hybrid_jax.evaluate", f"--embeddings={base / 'emb'}", "--dataset=xquad-r",
                    f"--languages={','.join(LANGS)}", f"--output_dir={out}")
  assert result.returncode == 0, result.stderr
  return out, result


@pytest.mark.real_data
def test_evaluate_embeddings_cli_writes_every_report(oracle_run):
  out, result = oracle_run
  with open(out / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  check_results_schema(results, LANGS)
  summary = results["summary"]
  for key in ("monolingual", "cross_lingual", "multilingual"):
    assert summary[key]["map"] == pytest.approx(1.0)
    assert summary[key]["num_skipped"] == 0
  assert summary["monolingual"]["num_queries"] == 3 * 1190
  assert summary["cross_lingual"]["num_settings"] == 6
  assert summary["multilingual"]["rank_distance"] == pytest.approx(2.0)  # R = 3 languages
  assert all(s["recall@1"] == pytest.approx(1.0) for s in results["settings"])
  # The console table and results.md carry the same summary.
  assert "| monolingual (X->X) | 1.000 | 1.000 |" in result.stdout
  with open(out / "results.md", encoding="utf-8") as f:
    markdown = f.read()
  assert "| multilingual (X->all) | 1.000 |" in markdown and "## mAP grid" in markdown
  with open(out / "settings.csv", encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 9 + 3
  assert {r["setting"] for r in rows} == {"monolingual", "cross_lingual", "multilingual"}
  assert float(rows[-1]["rank_distance"]) == pytest.approx(2.0)
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  for name in ("grid_map.png", "rank_distance.png"):
    image = matplotlib.image.imread(str(out / name))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas
  with open(out / "results_meta.json", encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["num_queries"] == 3570 and meta["embedding_dim"] == 1190 + 8


@pytest.mark.real_data
def test_compare_cli_on_two_runs(oracle_run, subset, tmp_path):
  """B = noisy embeddings: worse everywhere and significantly so; A vs A: no difference, p = 1."""
  oracle_out, _ = oracle_run
  queries, candidates = topic_embeddings(subset, noise=0.2, seed=0)  # mAP ~0.75
  emb = tmp_path / "emb"
  embeddings_io.save(str(emb), "queries", subset.query_uids, queries)
  embeddings_io.save(str(emb), "candidates", subset.candidate_uids, candidates)
  noisy = runner.run(runner.RunOptions(embeddings=str(emb), languages=tuple(LANGS),
                                       output_dir=str(tmp_path / "noisy"), show_progress=False))
  result = _run_cli("hybrid_jax.compare", str(oracle_out), str(tmp_path / "noisy"),
                    "--permutations=2000", f"--output_json={tmp_path / 'rows.json'}")
  assert result.returncode == 0, result.stderr
  with open(tmp_path / "rows.json", encoding="utf-8") as f:
    rows = {r["name"]: r for r in json.load(f)}
  assert len(rows) == 3 + 9 + 3  # summaries, X->Y settings, X->all
  for key in ("monolingual", "cross_lingual", "multilingual"):
    assert rows[key]["a"] == pytest.approx(1.0)
    assert rows[key]["b"] == pytest.approx(noisy["summary"][key]["map"], abs=1e-9)
    assert rows[key]["diff"] < -0.05 and rows[key]["p_value"] < 0.01
  assert "cross_lingual" in result.stdout and "p(Holm)" in result.stdout
  same = significance.compare(str(oracle_out), str(oracle_out), num_permutations=200)
  assert all(r.diff == 0.0 and r.p_value == 1.0 for r in same)
  with pytest.raises(FileNotFoundError, match=r"results\.json does not exist"):
    significance.compare(str(oracle_out), str(tmp_path / "nowhere"))


@pytest.mark.real_data
def test_evaluate_model_cli_export_and_cache(subset, tmp_path, capsys):
  """`--model` on a tiny random model; its exported embeddings score the same via --embeddings.

  batch_size 4096 puts each side in one batch: two compiled shapes (compiling is what costs here).
  """
  langs = ["en", "de"]
  texts = [t for t, lang in zip(subset.query_texts, subset.query_langs) if lang in langs]
  texts += [t for t, lang in zip(subset.candidate_texts, subset.candidate_langs) if lang in langs]
  model = write_tiny_model(str(tmp_path / "tiny"), texts, max_position=64)
  out, exported = tmp_path / "out", tmp_path / "exported"
  args = [f"--model={model}", "--dataset=xquad-r", "--languages=en,de", f"--output_dir={out}",
          "--query_max_length=32", "--passage_max_length=48", "--batch_size=4096",
          f"--export_embeddings={exported}"]
  result = _run_cli("hybrid_jax.evaluate", *args)
  assert result.returncode == 0, result.stderr
  assert "embedding queries: 2380/2380 texts" in result.stderr and "ETA" in result.stderr
  with open(out / "results.json", encoding="utf-8") as f:
    from_model = json.load(f)
  check_results_schema(from_model, langs)
  # A random encoder still beats chance (shared words), but is far from perfect.
  assert 0.01 < from_model["summary"]["monolingual"]["map"] < 0.9

  # The exported rows are the model's embeddings of the prefixed texts, in uid order.
  uids, queries = embeddings_io.load(str(exported), "queries")
  en_de = subset.subset_languages(langs)
  assert uids == en_de.query_uids
  direct = inference.TextEmbedder.from_pretrained(model, max_length=32).embed(
      en_de.query_texts[:40], prefix="Query: ")
  np.testing.assert_allclose(queries[:40], direct, atol=1e-6)

  # Scoring the export gives the same numbers; a second --model run reuses the cache.
  again = runner.run(runner.RunOptions(embeddings=str(exported), languages=("en", "de"),
                                       output_dir=str(tmp_path / "again"), show_progress=False))
  assert again == from_model
  capsys.readouterr()
  cached = runner.run(runner.RunOptions(
      model=model, languages=("en", "de"), output_dir=str(out), query_max_length=32,
      passage_max_length=48, batch_size=4096))
  err = capsys.readouterr().err
  assert "reusing cached queries embeddings" in err and "reusing cached candidates" in err
  assert "embedding queries" not in err and cached == from_model


@pytest.mark.real_data
def test_clear_errors(subset, tmp_path):
  with pytest.raises(runner.EvaluateUsageError, match=r"exactly one source"):
    runner.run(runner.RunOptions(model="a", embeddings="b", show_progress=False))
  with pytest.raises(ValueError, match=r"'xx'.*Languages present"):
    runner.run(runner.RunOptions(embeddings=str(tmp_path), languages=("en", "xx"),
                                 show_progress=False))
  queries, candidates = topic_embeddings(subset)
  embeddings_io.save(str(tmp_path / "emb"), "queries", subset.query_uids, queries)
  embeddings_io.save(str(tmp_path / "emb"), "candidates", subset.candidate_uids, candidates)
  with pytest.raises(embeddings_io.EmbeddingsError, match=r"query uids have no embedding"):
    runner.run(runner.RunOptions(embeddings=str(tmp_path / "emb"), languages=("en", "es"),
                                 output_dir=str(tmp_path / "out"), show_progress=False))
  # The command line turns these into one "error:" line and exit status 2, before any encoding.
  result = _run_cli("hybrid_jax.evaluate", f"--model={tmp_path / 'no_model'}", "--languages=en",
                    f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 2
  assert "error: --model=" in result.stderr and "is not a directory" in result.stderr
  assert "Traceback" not in result.stderr


def test_missing_directories_are_user_errors(tmp_path):
  """Each directory flag is checked before any data or model is read; the message names the
  flag, what is there, and what the directory should hold."""
  (tmp_path / "a_file").write_text("not a directory")
  for flag, expected in (("model", "Hugging Face model directory"),
                         ("workdir", "training run directory"), ("embeddings", "queries.npy")):
    with pytest.raises(runner.MissingPathError,
                       match=rf"--{flag}=.*nowhere' is not a directory \(found nothing there\); "
                             rf"expected .*{expected}"):
      runner.run(runner.RunOptions(**{flag: str(tmp_path / "nowhere")}, show_progress=False))
  with pytest.raises(runner.MissingPathError, match=r"--data_dir=.*a_file' is not a directory "
                                                    r"\(found a file\).*corpus\.jsonl"):
    runner.run(runner.RunOptions(embeddings=str(tmp_path), dataset="beir",
                                 data_dir=str(tmp_path / "a_file"), show_progress=False))
  assert issubclass(runner.MissingPathError, errors.UserError)
  # A synthetic run's generator comes from the workdir's config.json: a missing workdir must not
  # fall back to the default generator's ids.
  with pytest.raises(runner.MissingPathError, match=r"--workdir="):
    runner.run(runner.RunOptions(dataset="synthetic", workdir=str(tmp_path / "nowhere"),
                                 show_progress=False))


@pytest.mark.real_data
def test_evaluate_workdir_source(subset, tmp_path):
  """--workdir: parameters read by checkpointing.load_params score like the same model's
  Hugging Face directory (checked on en->en, which no other language affects)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from hybrid_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top

  texts = [t for t, lang in zip(subset.query_texts + subset.candidate_texts,
                                subset.query_langs + subset.candidate_langs) if lang == "en"]
  model = write_tiny_model(str(tmp_path / "tiny"), texts, max_position=64, seed=3)
  pretrained = hf_checkpoint.load_pretrained(model)
  workdir = str(tmp_path / "run")
  checkpointing.write_run_files(workdir, ml_collections.ConfigDict({"seed": 0}),
                                pretrained.config, pretrained.tokenizer)
  checkpointer = checkpointing.Checkpointer(workdir, every_steps=1, keep=1, async_save=False)
  checkpointer.save_best(5, {"encoder": pretrained.params}, validation_loss=1.0)
  checkpointer.close()
  options = runner.RunOptions(workdir=workdir, step="best", languages=("en",), query_max_length=32,
                              passage_max_length=48, batch_size=4096, show_progress=False,
                              export_embeddings=str(tmp_path / "exported"))
  results = runner.run(options)
  assert os.path.isfile(os.path.join(workdir, "eval", "xquad-r-stepbest", "results.json"))
  (entry,) = results["settings"]
  assert entry["num_queries"] == 1190 and 0.01 < entry["map"] < 0.9
  # The run's query embeddings are the Hugging Face directory's, row for row.
  _, queries = embeddings_io.load(str(tmp_path / "exported"), "queries")
  en = subset.subset_languages(["en"])
  direct = inference.TextEmbedder.from_pretrained(model, max_length=32).embed(
      en.query_texts[:40], prefix="Query: ")
  np.testing.assert_allclose(queries[:40], direct, atol=1e-6)
  with pytest.raises(ValueError, match=r"no checkpoint at step 7"):
    runner.run(dataclasses.replace(options, step="7"))

  # The command scores the same; Orbax's INFO lines (one per checkpoint file operation, ~20 long
  # lines before the progress) stay out of its console unless --verbosity asks for them.
  result = _run_cli("hybrid_jax.evaluate", f"--workdir={workdir}", "--step=best", "--languages=en",
                    "--query_max_length=32", "--passage_max_length=48", "--batch_size=4096",
                    f"--output_dir={tmp_path / 'cli'}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "cli" / "results.json", encoding="utf-8") as f:
    assert json.load(f)["settings"] == results["settings"]
  absl_info = [l for l in result.stderr.splitlines() if re.match(r"I\d{4} [\d:.]+ +\d+ ", l)]
  assert not absl_info, absl_info[:3]
  assert "embedding queries: 1190/1190 texts" in result.stderr


@pytest.mark.real_data
def test_heldout_test_part_through_the_runner(subset, tmp_path):
  """--part=test scores only the held-out articles: their queries against their sentences, with
  the split from the flags or from the run's config.data; the oracle stays perfect there."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from hybrid_jax.data import lareqa  # pylint: disable=g-import-not-at-top

  emb = str(tmp_path / "emb")
  queries, candidates = topic_embeddings(subset)
  embeddings_io.save(emb, "queries", subset.query_uids, queries)
  embeddings_io.save(emb, "candidates", subset.candidate_uids, candidates)
  options = runner.RunOptions(embeddings=emb, languages=tuple(LANGS), part="test",
                              heldout_fraction=0.2, output_dir=str(tmp_path / "test"),
                              show_progress=False)
  results = runner.run(options)
  split = lareqa.HeldoutSplit(0.2)
  test = lareqa.select_part(lareqa.read_languages(data_dir("xquad-r"), LANGS),
                            lareqa.heldout_ids(data_dir("xquad-r"), split), "test")
  assert results["dataset"] == "xquad-r-test"
  mono = {e["query_lang"]: e["num_queries"] for e in results["settings"]
          if e["query_lang"] == e["candidate_lang"]}
  assert mono == {lang: len(test[lang].questions) for lang in LANGS}
  assert 200 < mono["en"] < 350  # ~20% of 1190, whole articles
  assert results["summary"]["multilingual"]["map"] == pytest.approx(1.0)
  with open(tmp_path / "test" / "results.md", encoding="utf-8") as f:
    assert "Part 'test' of the held-out split" in f.read()
  # The split of a run that trained on this dataset comes from its config; another run's not.
  trained = ml_collections.ConfigDict({"data": {"source": "lareqa", "path": "xquad-r",
                                                "heldout_fraction": 0.3, "heldout_unit": "article",
                                                "heldout_seed": 2}})
  spec = runner.evaluator_spec(dataclasses.replace(options, heldout_fraction=-1.0,
                                                   config=trained))
  assert (spec["heldout_fraction"], spec["heldout_unit"], spec["heldout_seed"]) == (
      0.3, "article", 2)
  trained.data.path = "mlqa-r"
  with pytest.raises(runner.EvaluateUsageError, match="needs the held-out split"):
    runner.evaluator_spec(dataclasses.replace(options, heldout_fraction=-1.0, config=trained))
  with pytest.raises(runner.EvaluateUsageError, match="splits LAReQA directories"):
    runner.evaluator_spec(dataclasses.replace(options, dataset="beir", data_dir=str(tmp_path)))


def test_remote_workdirs_are_not_checked_as_local_directories_and_write_locally():
  """launch/tpu.sh evaluate passes gs:// workdirs: no local-directory check, no config.json read
  through os.path (epath handles gs://), and outputs default to eval_results/<run>/ locally."""
  opts = runner.RunOptions(workdir="gs://bucket/runs/xlmr_hybrid", dataset="xquad-r",
                           step="best")
  runner.check_directories(opts)  # no MissingPathError
  assert runner.default_output_dir(opts) == os.path.join("eval_results", "xlmr_hybrid",
                                                         "xquad-r-stepbest")
  local = dataclasses.replace(opts, workdir="/runs/xlmr_hybrid")
  assert runner.default_output_dir(local) == "/runs/xlmr_hybrid/eval/xquad-r-stepbest"
