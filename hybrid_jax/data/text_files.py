"""Opening and decoding the text files users give (JSONL, JSON, TSV, one text per line).

Python's own decode error names neither the file nor the line ("'utf-8' codec can't decode byte
0xff in position 4688", a position within some read buffer). The readers here decode line by line
from bytes, so an error names the file, the 1-based line and the 0-based byte offset in the file
(in the decompressed stream for .gz), and says what to do; a path that is a directory, a device
such as /dev/null, or an empty file is named as such instead of "does not exist".

Every function takes the reader's own `errors.UserError` subclass, so messages keep their type.
"""

from __future__ import annotations

import gzip
import os
import stat
from typing import Iterator

from hybrid_jax import errors

_BOM = b"\xef\xbb\xbf"


def check_file(path: str, what: str, error: type[errors.UserError],
               missing_hint: str = "", allow_empty: bool = False, quote: bool = True) -> None:
  """Raises `error` unless `path` is a non-empty regular file; `what` names it ("--input")."""
  shown = repr(path) if quote else path
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    raise error(f"{what} {shown} does not exist{missing_hint}") from None
  except OSError as e:
    raise error(f"{what} {shown} cannot be opened: {e.strerror or e}") from e
  if stat.S_ISDIR(mode):
    raise error(f"{what} {shown} is a directory, not a file{missing_hint}")
  if not stat.S_ISREG(mode):
    kind = ("a character device (such as /dev/null)" if stat.S_ISCHR(mode) else
            "a named pipe" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a block device" if stat.S_ISBLK(mode)
            else "not a regular file")
    raise error(f"{what} {shown} is {kind}, not a regular file; give the path of the file "
                "itself (it may be read more than once, so it cannot be a stream)")
  if not allow_empty and os.path.getsize(path) == 0:
    raise error(f"{what} {shown} is empty (0 bytes): no records in it; expected data")


def decode_line(path: str, line_number: int, line_offset: int, raw: bytes,
                error: type[errors.UserError], compressed: bool = False) -> str:
  """raw (one line's bytes, starting at byte `line_offset` of the file) as UTF-8 text, or `error`
  naming the file, the line and the byte offset of the first undecodable byte."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    offset = line_offset + e.start
    bad = raw[e.start:e.end].hex(" ")
    where = "of the decompressed data" if compressed else "in the file"
    if e.reason == "unexpected end of data":
      problem = (f"the line ends in the middle of a multi-byte character (bytes {bad}); the "
                 "file was probably cut short (an interrupted copy or download)")
    else:
      problem = f"byte(s) {bad}: {e.reason}"
    raise error(f"{path}:{line_number}: is not UTF-8 text at byte offset {offset} {where} "
                f"(column {e.start + 1} of the line): {problem}. Convert the file to UTF-8 (e.g. "
                "iconv -f LATIN1 -t UTF-8) or fetch it again.") from None


def iter_raw_lines(path: str, what: str, error: type[errors.UserError]
                   ) -> Iterator[tuple[int, int, bytes]]:
  """(1-based line number, byte offset of the line, its bytes) of a file (.gz decompressed),
  a leading UTF-8 byte-order mark dropped; read errors (a corrupt .gz) name the file."""
  compressed = path.endswith(".gz")
  offset = 0
  try:
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
      for line_number, raw in enumerate(f, start=1):
        start = offset
        offset += len(raw)
        if line_number == 1 and raw.startswith(_BOM):
          raw, start = raw[len(_BOM):], start + len(_BOM)
        yield line_number, start, raw
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
    raise error(f"cannot read {what} {path} after byte {offset}: {e}") from e


def iter_lines(path: str, what: str, error: type[errors.UserError], missing_hint: str = "",
               keep_line_breaks: bool = False, quote: bool = True) -> Iterator[tuple[int, str]]:
  """(1-based line number, decoded line) of a UTF-8 text file (.gz decompressed), streamed.

  A leading byte-order mark is dropped. Line breaks are "\\n" (a "\\r" before it is removed too
  unless keep_line_breaks). The file must be a non-empty regular file (check_file)."""
  check_file(path, what, error, missing_hint, quote=quote)
  compressed = path.endswith(".gz")
  for line_number, start, raw in iter_raw_lines(path, what, error):
    text = decode_line(path, line_number, start, raw, error, compressed)
    if not keep_line_breaks:
      text = text.removesuffix("\n").removesuffix("\r")
    yield line_number, text


def read_text(path: str, what: str, error: type[errors.UserError], missing_hint: str = "",
              allow_empty: bool = False) -> str:
  """The whole decoded content of a UTF-8 file (a byte-order mark dropped); errors as above."""
  check_file(path, what, error, missing_hint, allow_empty=allow_empty)
  return "".join(decode_line(path, n, start, raw, error, path.endswith(".gz"))
                 for n, start, raw in iter_raw_lines(path, what, error))
