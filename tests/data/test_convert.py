"""Converter to parallel-examples JSONL: mMARCO-style TSV files (hand-made) and LAReQA directories."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hybrid_jax.data import convert
from hybrid_jax.data import lareqa
from hybrid_jax.data import locations
from hybrid_jax.data import records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LT = records.LanguageTexts


def _write(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture
def mmarco(tmp_path):
  _write(tmp_path / "queries" / "english.tsv",
         [("1", "what is a cat"), ("2", "who wrote faust"), ("3", "why is the sky blue"),
          ("9", "never in a triple")])
  _write(tmp_path / "queries" / "german.tsv",
         [("1", "was ist eine katze"), ("2", "wer schrieb faust"), ("3", "warum ist der himmel blau")])
  _write(tmp_path / "collection" / "english.tsv",
         [("10", "a cat is a small feline"), ("11", "dogs bark"), ("20", "goethe wrote faust"),
          ("21", "schiller wrote poems"), ("30", "rayleigh scattering")])
  _write(tmp_path / "collection" / "german.tsv",  # lacks passage 30 and negative 21
         [("10", "eine katze ist ein kleines tier"), ("11", "hunde bellen"),
          ("20", "goethe schrieb faust")])
  _write(tmp_path / "triples.tsv",
         [("1", "10", "11"), ("1", "10", "20"),  # only the first triple of a query counts
          ("2", "20", "21"), ("3", "30", "11")])
  return dict(queries=str(tmp_path / "queries" / "{lang}.tsv"),
              collection=str(tmp_path / "collection" / "{lang}.tsv"),
              triples=str(tmp_path / "triples.tsv"))


def test_mmarco_examples(mmarco):
  examples = convert.mmarco_examples(["english", "german"], mmarco["queries"],
                                     mmarco["collection"], mmarco["triples"])
  assert examples == [
      records.ParallelExample("1", {
          "english": LT("what is a cat", "a cat is a small feline", "dogs bark"),
          "german": LT("was ist eine katze", "eine katze ist ein kleines tier", "hunde bellen")}),
      records.ParallelExample("2", {
          "english": LT("who wrote faust", "goethe wrote faust", "schiller wrote poems"),
          "german": LT("wer schrieb faust", "goethe schrieb faust", None)}),  # negative missing
      records.ParallelExample("3", {  # german collection lacks the positive: english only
          "english": LT("why is the sky blue", "rayleigh scattering", "dogs bark")})]
  first_two = convert.mmarco_examples(["english"], mmarco["queries"], mmarco["collection"],
                                      mmarco["triples"], max_ids=2)
  assert [e.id for e in first_two] == ["1", "2"]


def test_mmarco_errors_name_the_file_and_line(mmarco, tmp_path):
  with open(mmarco["triples"], "a", encoding="utf-8") as f:
    f.write("4\t40\n")
  with pytest.raises(records.DataError,
                     match=r"triples.tsv:5: expected 3 non-empty tab-separated fields, found 2"):
    convert.mmarco_examples(["english"], mmarco["queries"], mmarco["collection"], mmarco["triples"])
  with pytest.raises(records.DataError, match=r"--queries='q.tsv' must contain '\{lang\}'"):
    convert.mmarco_examples(["english"], "q.tsv", mmarco["collection"], mmarco["triples"])
  with pytest.raises(records.DataError, match=r"triples file '.*nope.tsv' does not exist"):
    convert.mmarco_examples(["english"], mmarco["queries"], mmarco["collection"],
                            str(tmp_path / "nope.tsv"))
  with pytest.raises(records.DataError, match="--languages is required"):
    convert.mmarco_examples([], mmarco["queries"], mmarco["collection"], mmarco["triples"])


def _convert(*args):
  result = subprocess.run([sys.executable, "-m", "hybrid_jax.data.convert", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  return result


def test_mmarco_command_line(mmarco, tmp_path):
  out = str(tmp_path / "out" / "mmarco.jsonl")
  result = _convert("--from=mmarco", "--languages=english,german", f"--queries={mmarco['queries']}",
                    f"--collection={mmarco['collection']}", f"--triples={mmarco['triples']}",
                    f"--output={out}")
  assert "wrote 3 ids" in result.stderr and "'english': 3, 'german': 2" in result.stderr
  written = records.read_jsonl(out)
  assert written == convert.mmarco_examples(["english", "german"], mmarco["queries"],
                                            mmarco["collection"], mmarco["triples"])


@pytest.mark.real_data
def test_lareqa_command_line_round_trips_through_the_jsonl_source(tmp_path):
  out = str(tmp_path / "mlqa.jsonl")
  directory = os.path.join(locations.data_root(), "mlqa-r")
  _convert("--from=lareqa", f"--input={directory}", "--languages=de,en", f"--output={out}")
  written = records.read_jsonl(out)
  assert written == lareqa.training_examples(directory, ["de", "en"])
  assert len(written) == 1148 and sum("de" in e.languages for e in written) == 512
