r"""Downloads the LAReQA evaluation data (XQuAD-R, MLQA-R), checked file by file.

    python -m hybrid_jax.data.fetch [--datasets=xquad-r,mlqa-r] [--dir=DIR]
    python -m hybrid_jax.data.fetch --list        # every URL, SHA-256 and size; nothing fetched
    python -m hybrid_jax.data.fetch --check       # verify what is on disk; nothing fetched

Source: the google-research-datasets/lareqa repository on GitHub, at pinned commits. MLQA-R was
removed from that repository on 2020-04-28 (commit b91469b, "Removed MLQA-R"), so it is read from
the commit before (354d67d); XQuAD-R from the last commit (9bc8c7f). Every file's SHA-256 and size
are recorded below; a file is written under a temporary name and renamed into place only once its
checksum matched, so an interrupted or failed run never leaves a half-written file under a real
name. A re-run skips the files that are complete and replaces any that are not. Each dataset's
licence is written next to it (`LICENSE`, from the same commit) with a `SOURCE.md` that records
where every file came from.

Directory (locations.py): `--dir`, else $HYBRID_JAX_DATA, else ~/.cache/hybrid_jax/data, the same
place every reader looks. `--base_url` points at a mirror laid out like
raw.githubusercontent.com (`<base_url>/<commit>/<path>`; `file://` works), e.g. for air-gapped
clusters.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Callable, Sequence

from absl import app
from absl import flags

from hybrid_jax import errors
from hybrid_jax.data import locations

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/google-research-datasets/lareqa"
REPOSITORY_URL = "https://github.com/google-research-datasets/lareqa"
_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60


class FetchError(errors.UserError):
  """A download failed, or a file's checksum does not match the recorded one."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  path: str  # path inside the repository at the dataset's commit
  name: str  # file name inside the dataset folder
  sha256: str
  size: int


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str  # folder name under the data directory
  commit: str
  licence: str
  note: str
  files: tuple[RemoteFile, ...]

  @property
  def languages(self) -> tuple[str, ...]:
    """The languages with a file, known without the data (e.g. for planning a study)."""
    return tuple(sorted(f.name[:-len(".json")] for f in self.files if f.name.endswith(".json")))

  def url(self, remote: RemoteFile, base_url: str = DEFAULT_BASE_URL) -> str:
    return f"{base_url.rstrip('/')}/{self.commit}/{remote.path}"


def _language_files(folder: str, sizes_and_hashes: dict[str, tuple[int, str]]):
  return tuple(RemoteFile(f"{folder}/{lang}.json", f"{lang}.json", sha, size)
               for lang, (size, sha) in sorted(sizes_and_hashes.items()))


# SHA-256 of the files at the pinned commits (their git blob SHA-1s match the repository's).
DATASETS: dict[str, Dataset] = {
    "xquad-r": Dataset(
        name="xquad-r",
        commit="9bc8c7fb6dd8d01d72a05a93c2cb96882b0d299c",
        licence="CC BY-SA 4.0",
        note="XQuAD-R (Roy et al. 2020, arXiv:2004.05484): 11 languages x 1190 questions, "
             "13,014 candidate sentences. The licence file is the repository's root LICENSE.",
        files=_language_files("xquad-r", {
            "ar": (2234875, "c52922d3b8ac1ae03ed5ac38647ad59870dca3dda2beefe18ecdc30729acb69d"),
            "de": (732156, "16fb0f4bf4916154b585a20c24c66074591c9718a1affe764ff4697572328949"),
            "el": (2810127, "163fd43ee785a30eb534ae2061e9eaa766a7ee4e8ffce5e4b422480c150f64b6"),
            "en": (628651, "7b0954f39297c27a31fef610f0883337dd2907fa8699151dc922afdd0fa12ffe"),
            "es": (746335, "f8e836b2d91009c4363e04315f7ede363eedbbb49c67dda60de6c4aa782f58de"),
            "hi": (2408404, "ea45ba8ae4513d1533b222bebdc02a90bc319c055d3aeea68584a053d2e92872"),
            "ru": (2764904, "7f4dff853538b9a5fcc28c070b8bb983a5c5d190ac747b8e005a1ada9cab18f1"),
            "th": (2618544, "c3a041864c3a9fb0b4dd91cfdf99cf36b411b3e704c58a303c97bc6dc786cfe4"),
            "tr": (827827, "f3e8c13002bbce154a4578f535f7533cb70f3da08840e6b62735935baec7bd94"),
            "vi": (1132303, "e35926bf5cc6fc6ecbdfca49467aabeb454f08d152d7818143a906bd31dde995"),
            "zh": (959291, "80c2cde7b9c2fb134c303cbb52f2ba396ead9eb0014aec43993543d2ba9e93ed"),
        }) + (RemoteFile("LICENSE", "LICENSE",
                         "25ddafc153e4cfdafd70729574ef1b44348e1814709e57680d55347038d3f92c",
                         15058),),
    ),
    "mlqa-r": Dataset(
        name="mlqa-r",
        commit="354d67d1cd066854cdfbf5ad0e6105528976141d",
        licence="CC BY-NC 4.0 (non-commercial)",
        note="MLQA-R (Roy et al. 2020, arXiv:2004.05484), built from the MLQA dev split: 7 "
             "languages, 4199 questions (1148 ids), 20,534 candidate sentences. Removed from the "
             "repository in its next commit (b91469b, 2020-04-28); read from the commit before.",
        files=_language_files("mlqa-r", {
            "ar": (3329081, "2132fbc03208535c0fe01f2e2c5121d06f9c2aa799af93b0a719dbc105bdf137"),
            "de": (887185, "ce9454dc5aa6f2d85c23cd6e49cb367fbb7c4c6e62d7f71e355c6b5dae4d0886"),
            "en": (2251129, "fedd9a5cc0848dda80caf84aa36f482adaae230526a3f6e9e86926a93ef3b1e4"),
            "es": (819818, "70ecba276b8c96a692b120693a595d076ce94ad21d4b28311538a9fcbfe0f9d7"),
            "hi": (3179023, "4dd0fb3c06f737a5481d705bc1dcac7876712a5815c9265908fbb3a0696cb654"),
            "vi": (1807239, "9d3baff6ba03e6793b25594217265ea59a136b9733833dca8a9582a84a78ff85"),
            "zh": (1360698, "57f01d2fff50cf3392805635b01445339f225ad5bf28ba8443b12f8dbd1e69dc"),
        }) + (RemoteFile("mlqa-r/LICENSE", "LICENSE",
                         "336255dc30193e8e15d689d9481bb05673d89055718f3a96923a7ffb99adbbaf",
                         19333),),
    ),
}


@dataclasses.dataclass
class FetchReport:
  """What one run did, per file name (`<dataset>/<name>`)."""
  downloaded: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)  # already complete
  replaced: list[str] = dataclasses.field(default_factory=list)  # present but corrupt: fetched again


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
      digest.update(chunk)
  return digest.hexdigest()


def file_problem(path: str, remote: RemoteFile) -> str:
  """'' when `path` is the recorded file, else what is wrong with it."""
  if not os.path.lexists(path):
    return "missing"
  if not os.path.isfile(path):
    return "not a regular file"
  size = os.path.getsize(path)
  if size != remote.size:
    return f"{size} bytes, expected {remote.size}"
  sha = file_sha256(path)
  return "" if sha == remote.sha256 else f"sha256 {sha}, expected {remote.sha256}"


def select(names: Sequence[str]) -> list[Dataset]:
  """The datasets named (all when empty), or FetchError listing the known names."""
  unknown = [n for n in names if n not in DATASETS]
  if unknown:
    raise FetchError(f"--datasets names {unknown}; known datasets: {sorted(DATASETS)}.")
  return [DATASETS[n] for n in (names or DATASETS)]


def _manual_instructions(dataset: Dataset, folder: str, base_url: str) -> str:
  return (f"Without network access, download the files by hand (`{locations.FETCH_COMMAND} "
          f"--list` prints every URL; e.g. `curl -L -o {folder}/{dataset.files[0].name} "
          f"{dataset.url(dataset.files[0], base_url)}`), place them in {folder}, and run this "
          "command again: it checks them and fetches only what is missing or corrupt. "
          "--base_url=URL reads from a mirror with the same layout (file:// works).")


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _publish(tmp_path: str, final_path: str) -> None:
  """Renames a finished temporary file into place, with the permissions a plain open() gives."""
  os.chmod(tmp_path, 0o666 & ~_umask())
  os.replace(tmp_path, final_path)


def _download(url: str, remote: RemoteFile, final_path: str, log: Callable[[str], None],
              manual: str) -> None:
  """Streams `url` into a temporary file beside `final_path`; renames it there once verified."""
  folder = os.path.dirname(final_path)
  fd, tmp_path = tempfile.mkstemp(prefix=f".{remote.name}.", suffix=".part", dir=folder)
  try:
    digest, done, start, next_report = hashlib.sha256(), 0, time.time(), 1.0
    try:
      with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as src:
        for chunk in iter(lambda: src.read(_CHUNK_BYTES), b""):
          out.write(chunk)
          digest.update(chunk)
          done += len(chunk)
          elapsed = time.time() - start
          if elapsed >= next_report and done < remote.size:
            eta = elapsed / done * (remote.size - done)
            log(f"  {remote.name}: {100 * done / remote.size:.0f}% of "
                f"{remote.size / 1e6:.1f} MB, ETA {eta:.0f}s")
            next_report += 5.0
        out.flush()
        os.fsync(out.fileno())
    except (urllib.error.URLError, OSError, ValueError) as e:
      reason = getattr(e, "reason", None) or e
      raise FetchError(f"Could not download {url}: {reason}. {manual}") from e
    sha = digest.hexdigest()
    if done != remote.size or sha != remote.sha256:
      raise FetchError(
          f"Checksum mismatch for {url}: got {done} bytes with sha256 {sha}, expected "
          f"{remote.size} bytes with sha256 {remote.sha256}. Nothing was written to "
          f"{final_path}. The download was corrupted or the source changed: run the command "
          f"again, or check the file by hand. {manual}")
    _publish(tmp_path, final_path)
  finally:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)


def _write_source_md(dataset: Dataset, folder: str, base_url: str) -> None:
  lines = [f"# {dataset.name}", "", dataset.note, "",
           f"- Source: {REPOSITORY_URL} at commit {dataset.commit}",
           f"- Licence: **{dataset.licence}** (the `LICENSE` file beside this one)",
           f"- Fetched by `{locations.FETCH_COMMAND}` from {base_url}", "",
           "| file | bytes | sha256 | repository path |", "|---|---|---|---|"]
  lines += [f"| {r.name} | {r.size} | {r.sha256} | {r.path} |" for r in dataset.files]
  fd, tmp_path = tempfile.mkstemp(prefix=".SOURCE.md.", suffix=".part", dir=folder)
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  _publish(tmp_path, os.path.join(folder, "SOURCE.md"))


def fetch(datasets: Sequence[Dataset], root: str, base_url: str = DEFAULT_BASE_URL,
          log: Callable[[str], None] = print) -> FetchReport:
  """Makes `<root>/<dataset>/` hold every recorded file of each dataset, verified."""
  report = FetchReport()
  for dataset in datasets:
    folder = os.path.join(root, dataset.name)
    try:
      os.makedirs(folder, exist_ok=True)
    except OSError as e:
      raise FetchError(f"Cannot create the data folder {folder}: {e}. Choose another with "
                       f"--dir=DIR or ${locations.DATA_ENV_VAR}.") from e
    for stale in glob.glob(os.path.join(folder, ".*.part")):  # left by a killed run
      os.remove(stale)
    manual = _manual_instructions(dataset, folder, base_url)
    total = sum(r.size for r in dataset.files)
    log(f"{dataset.name} ({total / 1e6:.1f} MB, {dataset.licence}) -> {folder}")
    for remote in dataset.files:
      key = f"{dataset.name}/{remote.name}"
      final_path = os.path.join(folder, remote.name)
      problem = file_problem(final_path, remote)
      if not problem:
        report.skipped.append(key)
        continue
      if problem != "missing":
        log(f"  {remote.name}: {problem}; fetching it again")
        if os.path.isdir(final_path) and not os.path.islink(final_path):
          raise FetchError(f"{final_path} is a directory where a file belongs; remove it and "
                           "run the command again.")
        report.replaced.append(key)
      else:
        report.downloaded.append(key)
      _download(dataset.url(remote, base_url), remote, final_path, log, manual)
    _write_source_md(dataset, folder, base_url)
    log(f"  {len(dataset.files)} files verified (sha256). Licence: {dataset.licence}, written "
        f"to {os.path.join(folder, 'LICENSE')}.")
  return report


def check(datasets: Sequence[Dataset], root: str) -> list[str]:
  """Problems of the files on disk ('<dataset>/<name>: <problem>'); empty when all are good."""
  return [f"{d.name}/{r.name}: {problem}" for d in datasets for r in d.files
          if (problem := file_problem(os.path.join(root, d.name, r.name), r))]


_DATASETS = flags.DEFINE_list("datasets", [], f"Datasets to fetch (default all: {sorted(DATASETS)}).")
_DIR = flags.DEFINE_string("dir", "", "Data directory (default $HYBRID_JAX_DATA, else "
                           "~/.cache/hybrid_jax/data). Each dataset gets a folder inside it.")
_BASE_URL = flags.DEFINE_string("base_url", DEFAULT_BASE_URL,
                                "Where to read from: <base_url>/<commit>/<path> (a mirror; "
                                "file:// works).")
_LIST = flags.DEFINE_bool("list", False, "Print every file's URL, size and SHA-256; fetch nothing.")
_CHECK = flags.DEFINE_bool("check", False, "Verify the files on disk; fetch nothing. Exit 1 if "
                           "any is missing or corrupt.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")

  def run():
    datasets = select(_DATASETS.value)
    root = locations.data_root(_DIR.value)
    if _LIST.value:
      for d in datasets:
        for r in d.files:
          print(f"{d.url(r, _BASE_URL.value)}  {r.size}  {r.sha256}  -> "
                f"{os.path.join(root, d.name, r.name)}")
      return
    if _CHECK.value:
      problems = check(datasets, root)
      for line in problems:
        print(line)
      print(f"{root}: {'all files verified' if not problems else f'{len(problems)} problem(s)'}")
      if problems:
        sys.exit(1)
      return
    report = fetch(datasets, root, _BASE_URL.value,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"{root}: {len(report.downloaded)} downloaded, {len(report.replaced)} replaced "
          f"(corrupt), {len(report.skipped)} already complete.")
    if root != locations.data_root():
      print(f"Readers look in {locations.data_root()}: set {locations.DATA_ENV_VAR}={root} "
            "to use this directory.")

  errors.exit_on_user_error(run)


if __name__ == "__main__":
  app.run(main)
