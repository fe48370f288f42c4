"""One training job per workdir: `<workdir>/.lock`, taken before the job writes anything.

Two jobs writing one workdir (a double-submitted SLURM job, a requeue racing the old job) would
interleave their checkpoints, best/, metrics and evaluations. The lock file records the holder,
{"host", "pid", "started", "command"}, and is held in one of two ways:

- Local and NFS paths: an OS lock (fcntl.flock, exclusive, non-blocking) for the job's lifetime.
  The kernel drops it when the process ends, however it ends (kill -9 included), so the lock of a
  dead job is free again: the next job takes it over with a WARNING naming the old holder, and
  `kill -9` then the same command still resumes. A second job while the first lives stops with a
  WorkdirLockedError naming the holder.
- Object stores (gs://, s3://) and filesystems without flock (ENOLCK / EOPNOTSUPP): a lease. The
  record gains "expires" and a daemon thread rewrites it every `lease_seconds / 4`. A lease is
  stale once it expired, or at once when its holder ran on this host and that pid is gone; a
  stale lease is taken over with a WARNING. etils.epath has no atomic create on object stores:
  after writing its lease a job reads it back and stops if another job's record is there, which
  leaves a window of one read-after-write between two jobs starting at the same moment, not a
  guarantee.

Several processes (multi-host): process 0 takes the lock for the run and the outcome is broadcast,
so every process stops together when the workdir is taken (`hold`).

A clean exit empties the record (and removes the file and the workdir when the job created the
workdir and wrote nothing else, e.g. it stopped on a bad data file), so a record left behind
always means a job that did not finish cleanly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Iterator

from etils import epath

from hybrid_jax import errors

LOCK_FILE = ".lock"
LEASE_SECONDS = 300.0
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class WorkdirLockedError(errors.UserError):
  """Another live job holds the workdir; the message names it and what to do."""


def _is_object_store(workdir: str) -> bool:
  return "://" in str(workdir)


def _new_record(lease_seconds: float | None = None) -> dict:
  record = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)[:400], "token": uuid.uuid4().hex}
  if lease_seconds is not None:
    record["expires"] = time.time() + lease_seconds
  return record


def _parse(text: str) -> dict | None:
  """The holder record, or None for an empty (released) or unreadable file."""
  try:
    record = json.loads(text) if text.strip() else None
  except json.JSONDecodeError:
    return None
  return record if isinstance(record, dict) else None


def describe(record: dict | None) -> str:
  if not record:
    return "an unknown job"
  text = (f"pid {record.get('pid')} on host {record.get('host')}, started "
          f"{record.get('started')}")
  return text + (f" ({record['command']})" if record.get("command") else "")


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError, OverflowError):
    return True  # someone else's live process (or a record we cannot judge): assume alive
  return True


def _lease_is_stale(record: dict) -> bool:
  if float(record.get("expires", 0)) < time.time():
    return True
  return record.get("host") == socket.gethostname() and not _pid_alive(record.get("pid"))


def _locked_error(workdir: str, record: dict | None) -> WorkdirLockedError:
  return WorkdirLockedError(
      f"--workdir={workdir} is in use by another training job: {describe(record)}. Two jobs "
      "writing one workdir would interleave their checkpoints and metrics. Wait for it to "
      "finish, stop it (it resumes from its last checkpoint when re-run), or give this job "
      f"another --workdir. (Lock file: {os.path.join(str(workdir), LOCK_FILE)}.)")


def _warn(message: str) -> None:
  print(f"WARNING: {message}", file=sys.stderr, flush=True)


class WorkdirLock:
  """The lock of one workdir for this process; `acquire()` / `release()` or a `with` block.

  Args:
    workdir: the run directory (created if missing).
    mechanism: "auto" (flock on local paths, else a lease), "flock" or "lease".
    lease_seconds: how long a lease lasts without renewal (lease mechanism only).
  """

  def __init__(self, workdir: str, mechanism: str = "auto",
               lease_seconds: float = LEASE_SECONDS):
    if mechanism not in ("auto", "flock", "lease"):
      raise ValueError(f"mechanism={mechanism!r}")
    self.workdir = str(workdir)
    self.mechanism = mechanism
    self.lease_seconds = float(lease_seconds)
    self.record: dict | None = None
    self._fd: int | None = None
    self._created_workdir = False
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  @property
  def path(self) -> str:
    return os.path.join(self.workdir, LOCK_FILE)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  # --- acquire --------------------------------------------------------------------------------
  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises WorkdirLockedError naming the live holder."""
    root = epath.Path(self.workdir)
    if root.exists() and not root.is_dir():
      raise WorkdirLockedError(f"--workdir={self.workdir} is a file, not a directory; give a "
                               "directory for the run's checkpoints and metrics.")
    if not root.exists():
      root.mkdir(parents=True, exist_ok=True)
      self._created_workdir = True
    use_lease = self.mechanism == "lease" or (self.mechanism == "auto" and
                                              _is_object_store(self.workdir))
    if not use_lease and not self._acquire_flock():
      if self.mechanism == "flock":
        raise WorkdirLockedError(f"{self.path}: this filesystem has no file locks (flock)")
      use_lease = True
    if use_lease:
      self._acquire_lease()
    return self

  def _acquire_flock(self) -> bool:
    """True once held; False when the filesystem has no flock (the caller uses a lease)."""
    import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _parse(_read_fd(fd))
        os.close(fd)
        self._undo_created_workdir()
        raise _locked_error(self.workdir, holder) from None
      except OSError as e:
        os.close(fd)
        if e.errno in _NO_FLOCK:
          return False
        raise
      # A releasing holder may have removed the file between our open and flock: then we hold
      # a lock on a file no longer at the path, and must lock the one that is there now.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    previous = _parse(_read_fd(fd))
    if previous:
      # The kernel released the holder's flock, so that process is gone: it ended without
      # emptying the record (killed, crashed, its machine lost).
      _warn(f"taking over the lock of {self.workdir} from {describe(previous)}: that job ended "
            "without releasing it (killed or crashed); resuming from its checkpoints")
    self.record = _new_record()
    _write_fd(fd, json.dumps(self.record))
    self._fd = fd
    return True

  def _acquire_lease(self) -> None:
    path = epath.Path(self.workdir) / LOCK_FILE
    previous = _parse(path.read_text()) if path.exists() else None
    if previous and not _lease_is_stale(previous):
      self._undo_created_workdir()
      raise _locked_error(self.workdir, previous)
    self.record = _new_record(self.lease_seconds)
    path.write_text(json.dumps(self.record))
    back = _parse(path.read_text()) if path.exists() else None
    if not back or back.get("token") != self.record["token"]:
      self.record = None
      raise _locked_error(self.workdir, back)  # a job that started at the same moment won
    if previous:
      _warn(f"taking over the lease of {self.workdir} from {describe(previous)}: it expired or "
            "its process is gone; resuming from its checkpoints")
    self._heartbeat = threading.Thread(target=self._renew, args=(path,), daemon=True,
                                       name="workdir-lease")
    self._heartbeat.start()

  def _renew(self, path: epath.Path) -> None:
    while not self._stop.wait(self.lease_seconds / 4):
      try:
        current = _parse(path.read_text()) if path.exists() else None
        if current and current.get("token") != self.record["token"]:
          _warn(f"the lease of {self.workdir} was taken over by {describe(current)} while this "
                "job ran (this job stalled past its lease); stop one of the two jobs")
          return
        self.record["expires"] = time.time() + self.lease_seconds
        path.write_text(json.dumps(self.record))
      except Exception as e:  # pylint: disable=broad-except  (a transient store error: retry)
        _warn(f"could not renew the lease of {self.workdir}: {e}")

  # --- release --------------------------------------------------------------------------------
  def release(self) -> None:
    """Empties the record and drops the lock (removing what an aborted start created)."""
    if self._heartbeat is not None:
      self._stop.set()
      self._heartbeat.join(timeout=10)
      self._heartbeat = None
    if self._fd is not None:
      import fcntl  # pylint: disable=g-import-not-at-top
      only_lock = os.listdir(self.workdir) == [LOCK_FILE]
      if only_lock:
        os.unlink(self.path)  # before the unlock: a waiter then re-checks the inode (above)
      else:
        os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
      self._undo_created_workdir()
    elif self.record is not None:
      path = epath.Path(self.workdir) / LOCK_FILE
      current = _parse(path.read_text()) if path.exists() else None
      if current and current.get("token") == self.record["token"]:
        if [p.name for p in epath.Path(self.workdir).iterdir()] == [LOCK_FILE]:
          path.unlink()
        else:
          path.write_text("")
      self._undo_created_workdir()
    self.record = None

  def _undo_created_workdir(self) -> None:
    """The workdir this job created, when it stayed empty: a failed start leaves nothing."""
    if self._created_workdir:
      root = epath.Path(self.workdir)
      try:
        if not any(root.iterdir()):
          root.rmdir()
      except (OSError, ValueError):  # epath raises ValueError for a directory that filled up
        pass  # it holds something now (another job's lock): keep it
      self._created_workdir = False


def _read_fd(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  chunks = []
  while chunk := os.read(fd, 65536):
    chunks.append(chunk)
  return b"".join(chunks).decode("utf-8", errors="replace")


def _write_fd(fd: int, text: str) -> None:
  os.ftruncate(fd, 0)
  os.pwrite(fd, text.encode("utf-8"), 0)
  os.fsync(fd)


def live_holder(workdir: str) -> str | None:
  """A description of the live job holding `workdir`, or None when it is free (for readers such
  as evaluation, which never take the lock but must not rename what a trainer is using)."""
  path = os.path.join(str(workdir), LOCK_FILE)
  if _is_object_store(workdir):
    lock_path = epath.Path(path)
    record = _parse(lock_path.read_text()) if lock_path.exists() else None
    return describe(record) if record and not _lease_is_stale(record) else None
  import fcntl  # pylint: disable=g-import-not-at-top
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return describe(_parse(_read_fd(fd)))
    except OSError:  # no flock here: judge the record as a lease
      record = _parse(_read_fd(fd))
      return describe(record) if record and not _lease_is_stale(record) else None
    fcntl.flock(fd, fcntl.LOCK_UN)
    record = _parse(_read_fd(fd))  # no flock held: a lease (fallback mechanism) may still be
    if record and "expires" in record and not _lease_is_stale(record):
      return describe(record)
    return None
  finally:
    os.close(fd)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[WorkdirLock | None]:
  """The training job's lock for the `with` block: process 0 holds it, and every process raises
  WorkdirLockedError when process 0 could not take it."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not taken and error is None:
      error = WorkdirLockedError(f"process 0 could not take the lock of --workdir={workdir}; "
                                 "its log names the job holding it")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
