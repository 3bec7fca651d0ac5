"""Small helpers shared by the command-line tools."""
from __future__ import annotations

import csv
import io
import os
import sys
import tempfile

import numpy as np


def quiet_logs():
  """Show only warnings from absl logging (orbax, XLA) unless --verbosity was given."""
  from absl import flags, logging
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def fail(message: str, code: int = 2):
  """Ends a command with one clear line on stderr (no traceback for user mistakes)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def atomic_write_text(path: str, text: str) -> None:
  """Writes a file via a temporary file + rename: readers never see half a file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w", newline="") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def progress(iterable=None, total=None, desc=None, unit="it"):
  """A tqdm progress bar on stderr (disabled when stderr is not a terminal in CI)."""
  from tqdm.auto import tqdm
  return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True,
              disable=None, file=sys.stderr)


def inputs_and_output(flag_values, argv, output_kind: str = "a .csv file") -> list[str]:
  """Inputs from --input (repeatable) plus positional paths (shell globs); checks that
  --output is given and is not a folder. Ends the command with one line otherwise."""
  inputs = list(flag_values.input) + list(argv[1:])
  output = flag_values.output
  if not output:
    fail(f"--output is required ({output_kind})")
  if not inputs:
    fail("give at least one --input=PATH (TIFF file or folder)")
  if os.path.isdir(output):
    fail(f"--output={output} is a folder; give {output_kind} name")
  return inputs


def number(value, spec: str) -> str:
  """A CSV cell: the number formatted with spec, or empty when it is NaN/inf."""
  return format(value, spec) if np.isfinite(value) else ""


def csv_text(columns, rows, header_lines=()) -> str:
  """CSV text: '# '-prefixed header lines, the column names, then the rows."""
  buf = io.StringIO()
  for line in header_lines:
    buf.write(f"# {line}\n")
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(columns)
  writer.writerows(rows)
  return buf.getvalue()
