"""The data fetcher: recorded checksums, atomic writes, resume after an interruption or a kill,
corrupt files replaced, clear offline errors; and, on the real data, a fetch from a file:// mirror
whose every file matches the SHA-256 recorded in the code."""

from __future__ import annotations

import glob
import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hybrid_jax.data import fetch
from hybrid_jax.data import lareqa
from hybrid_jax.data import locations

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _toy_dataset(mirror, sizes=(300_000, 5_000, 120_000)) -> fetch.Dataset:
  """A dataset of a few files under `<mirror>/<COMMIT>/toy/`, with their true checksums."""
  os.makedirs(mirror / COMMIT / "toy", exist_ok=True)
  files = []
  for i, size in enumerate(sizes):
    data = hashlib.sha256(str(i).encode()).digest() * (size // 32) + b"x" * (size % 32)
    (mirror / COMMIT / "toy" / f"l{i}.json").write_bytes(data)
    files.append(fetch.RemoteFile(f"toy/l{i}.json", f"l{i}.json", hashlib.sha256(data).hexdigest(),
                                  size))
  (mirror / COMMIT / "LICENSE").write_text("Toy licence\n")
  files.append(fetch.RemoteFile("LICENSE", "LICENSE",
                                hashlib.sha256(b"Toy licence\n").hexdigest(), 12))
  return fetch.Dataset("toy", COMMIT, "CC0", "A toy dataset.", tuple(files))


def _fetch(dataset, root, mirror):
  return fetch.fetch([dataset], str(root), f"file://{mirror}", log=lambda line: None)


def _leftovers(folder):
  return glob.glob(os.path.join(folder, ".*.part"))


def test_fetch_verifies_writes_licence_and_skips_complete_files(tmp_path):
  mirror, root = tmp_path / "mirror", tmp_path / "data"
  dataset = _toy_dataset(mirror)
  report = _fetch(dataset, root, mirror)
  assert report.downloaded == ["toy/l0.json", "toy/l1.json", "toy/l2.json", "toy/LICENSE"]
  assert fetch.check([dataset], str(root)) == []
  assert (root / "toy" / "LICENSE").read_text() == "Toy licence\n"
  source = (root / "toy" / "SOURCE.md").read_text()
  assert "Licence: **CC0**" in source and dataset.files[0].sha256 in source and COMMIT in source
  assert oct(os.stat(root / "toy" / "l0.json").st_mode & 0o777) == oct(0o666 & ~_umask())

  again = _fetch(dataset, root, mirror)
  assert again.downloaded == [] and again.replaced == [] and len(again.skipped) == 4


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_corrupt_files_on_disk_are_replaced(tmp_path):
  mirror, root = tmp_path / "mirror", tmp_path / "data"
  dataset = _toy_dataset(mirror)
  _fetch(dataset, root, mirror)
  truncated, garbled = root / "toy" / "l0.json", root / "toy" / "l2.json"
  truncated.write_bytes(truncated.read_bytes()[:1000])
  data = bytearray(garbled.read_bytes())
  data[500:510] = b"\xff" * 10  # same size, wrong bytes
  garbled.write_bytes(bytes(data))
  assert [p.split(":")[0] for p in fetch.check([dataset], str(root))] == ["toy/l0.json",
                                                                          "toy/l2.json"]
  report = _fetch(dataset, root, mirror)
  assert report.replaced == ["toy/l0.json", "toy/l2.json"]
  assert report.skipped == ["toy/l1.json", "toy/LICENSE"]
  assert fetch.check([dataset], str(root)) == []


def test_checksum_mismatch_leaves_nothing_written(tmp_path):
  mirror, root = tmp_path / "mirror", tmp_path / "data"
  dataset = _toy_dataset(mirror)
  bad = mirror / COMMIT / "toy" / "l1.json"
  bad.write_bytes(b"!" + bad.read_bytes()[1:])  # the source changed or the transfer corrupted it
  with pytest.raises(fetch.FetchError, match=r"Checksum mismatch for file://.*toy/l1\.json: got "
                     r"5000 bytes with sha256 [0-9a-f]{64}, expected 5000 bytes.*Nothing was "
                     r"written"):
    _fetch(dataset, root, mirror)
  assert sorted(os.listdir(root / "toy")) == ["l0.json"]  # the good file before it is kept
  assert _leftovers(str(root / "toy")) == []


class _BrokenStream(io.BytesIO):
  """A response that dies part-way, like a dropped connection."""

  def read(self, size=-1):
    chunk = super().read(min(size, 4096))
    if self.tell() > 20_000:
      raise ConnectionResetError("connection reset by peer")
    return chunk


def test_interrupted_download_resumes(tmp_path, monkeypatch):
  mirror, root = tmp_path / "mirror", tmp_path / "data"
  dataset = _toy_dataset(mirror)
  real_urlopen = fetch.urllib.request.urlopen

  def dropping_urlopen(url, timeout):
    if url.endswith("l2.json"):
      return _BrokenStream((mirror / COMMIT / "toy" / "l2.json").read_bytes())
    return real_urlopen(url, timeout=timeout)

  monkeypatch.setattr(fetch.urllib.request, "urlopen", dropping_urlopen)
  with pytest.raises(fetch.FetchError, match=r"Could not download file://.*l2\.json: connection "
                     r"reset by peer\. Without network access, download the files by hand"):
    _fetch(dataset, root, mirror)
  assert sorted(os.listdir(root / "toy")) == ["l0.json", "l1.json"]
  assert _leftovers(str(root / "toy")) == []

  monkeypatch.setattr(fetch.urllib.request, "urlopen", real_urlopen)
  report = _fetch(dataset, root, mirror)
  assert report.skipped == ["toy/l0.json", "toy/l1.json"]
  assert report.downloaded == ["toy/l2.json", "toy/LICENSE"]
  assert fetch.check([dataset], str(root)) == []


_SLOW_FETCH = textwrap.dedent("""
    import io, sys, time, urllib.request
    from hybrid_jax.data import fetch
    real = urllib.request.urlopen
    class Slow(io.BytesIO):
      def read(self, size=-1):
        time.sleep(0.05)
        return super().read(min(size, 2048))
    urllib.request.urlopen = lambda url, timeout: Slow(real(url, timeout=timeout).read())
    dataset = fetch.Dataset("toy", sys.argv[3], "CC0", "", tuple(
        fetch.RemoteFile(p, n, h, int(s)) for p, n, h, s in
        (f.split(",") for f in sys.argv[4:])))
    fetch.fetch([dataset], sys.argv[1], "file://" + sys.argv[2], log=lambda line: None)
""")


def test_killed_run_leaves_no_partial_file_and_a_rerun_completes(tmp_path):
  mirror, root = tmp_path / "mirror", tmp_path / "data"
  dataset = _toy_dataset(mirror)
  specs = [f"{r.path},{r.name},{r.sha256},{r.size}" for r in dataset.files]
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_FETCH, str(root), str(mirror), COMMIT]
                          + specs)
  deadline = time.time() + 60
  while not _leftovers(str(root / "toy")) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  assert _leftovers(str(root / "toy")), "the download never started"
  time.sleep(0.3)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _leftovers(str(root / "toy")) and not (root / "toy" / "l0.json").exists()
  report = _fetch(dataset, root, mirror)
  assert report.downloaded == ["toy/l0.json", "toy/l1.json", "toy/l2.json", "toy/LICENSE"]
  assert _leftovers(str(root / "toy")) == [] and fetch.check([dataset], str(root)) == []


def test_offline_error_names_the_url_and_the_manual_route(tmp_path):
  dataset = _toy_dataset(tmp_path / "mirror")
  with pytest.raises(fetch.FetchError) as e:
    fetch.fetch([dataset], str(tmp_path / "data"), "http://127.0.0.1:9", log=lambda line: None)
  message = str(e.value)
  assert f"http://127.0.0.1:9/{COMMIT}/toy/l0.json" in message
  assert "--list` prints every URL" in message and "place them in" in message
  assert "--base_url" in message
  assert _leftovers(str(tmp_path / "data" / "toy")) == []


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
  for args, expected in [
      (["--datasets=xquad-r", f"--dir={tmp_path}", "--base_url=file:///nonexistent/mirror"],
       "error: Could not download file:///nonexistent/mirror/9bc8c7fb6dd8d01d72a05a93c2cb96882b0"
       "d299c/xquad-r/ar.json"),
      (["--datasets=xquad_r"], "error: --datasets names ['xquad_r']; known datasets: ['mlqa-r', "
       "'xquad-r']."),
  ]:
    result = subprocess.run([sys.executable, "-m", "hybrid_jax.data.fetch", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_cli_list_and_check(tmp_path):
  listed = subprocess.run([sys.executable, "-m", "hybrid_jax.data.fetch", "--list",
                           f"--dir={tmp_path}"], capture_output=True, text=True, timeout=60)
  assert listed.returncode == 0, listed.stderr
  lines = listed.stdout.splitlines()
  assert len(lines) == sum(len(d.files) for d in fetch.DATASETS.values()) == 20
  assert lines[-1].startswith(f"{fetch.DEFAULT_BASE_URL}/354d67d1cd066854cdfbf5ad0e6105528976141d"
                              "/mlqa-r/LICENSE  19333  336255dc")
  checked = subprocess.run([sys.executable, "-m", "hybrid_jax.data.fetch", "--check",
                            "--datasets=mlqa-r", f"--dir={tmp_path}"],
                           capture_output=True, text=True, timeout=60)
  assert checked.returncode == 1
  assert "mlqa-r/ar.json: missing" in checked.stdout and "8 problem(s)" in checked.stdout


@pytest.mark.real_data
def test_real_data_matches_the_recorded_checksums_and_fetches_from_a_mirror(tmp_path):
  root = locations.data_root()
  datasets = fetch.select([])
  assert fetch.check(datasets, root) == []  # the recorded SHA-256 values are the real files'
  mirror = tmp_path / "mirror"
  for dataset in datasets:  # laid out like raw.githubusercontent.com/<repo>/<commit>/<path>
    for remote in dataset.files:
      link = mirror / dataset.commit / remote.path
      link.parent.mkdir(parents=True, exist_ok=True)
      link.symlink_to(os.path.join(root, dataset.name, remote.name))
  report = fetch.fetch(datasets, str(tmp_path / "data"), f"file://{mirror}", log=lambda l: None)
  assert len(report.downloaded) == 20 and fetch.check(datasets, str(tmp_path / "data")) == []
  assert "CC BY-NC 4.0" in (tmp_path / "data" / "mlqa-r" / "SOURCE.md").read_text()
  assert "Attribution-NonCommercial" in (tmp_path / "data" / "mlqa-r" / "LICENSE").read_text()
  assert "Attribution-ShareAlike" in (tmp_path / "data" / "xquad-r" / "LICENSE").read_text()
  for dataset in datasets:  # the registry's languages (used to plan the study) are the files'
    assert list(dataset.languages) == lareqa.available_languages(os.path.join(root, dataset.name))
