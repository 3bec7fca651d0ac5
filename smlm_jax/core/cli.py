"""Small helpers shared by the command-line tools."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import re
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


def _no_such_config_field(e: Exception, argv) -> None:
  # ml_collections raises KeyError("'name'") or AttributeError(KeyError("'name'\nDid
  # you mean \"other\" instead of \"name\"?")): the name is the first line
  arg = e
  while isinstance(arg, BaseException) and arg.args:
    arg = arg.args[0]
  first, _, rest = str(arg).partition("\n")
  field = first.strip().strip("\"'")
  hint = re.search(r'Did you mean "([^"]+)"', rest)
  given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  named = [a for a in given if field and field in a.split(".")] or given
  fail(f"{named[0] if named else '--config'}: the config has no field {field!r}"
       + (f"; did you mean {hint.group(1)!r}?" if hint else "")
       + " (python -m smlm_jax.train --config=FILE --print_config lists them)")


@contextlib.contextmanager
def config_override_errors(argv=None):
  """One line instead of a traceback when a ``--config.FIELD=VALUE`` override names no
  field of the config: ml_collections raises AttributeError/KeyError (not a flags
  error), when the config flag is defined (default config) or when flags are parsed."""
  try:
    yield
  except (AttributeError, KeyError) as e:
    _no_such_config_field(e, sys.argv if argv is None else argv)


def parse_flags(argv):
  """The flag parser for ``app.run(main, flags_parser=cli.parse_flags)``: a bad flag
  value (absl: "FATAL Flags parsing error", exit 1) and an override of no config field
  (:func:`config_override_errors`) each end with one ``error:`` line and exit 2."""
  from absl import flags
  with config_override_errors(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(f"{e} (--helpshort lists the flags)")


def run_app(main, define_flags=None):
  """``app.run(main)`` with one-line flag errors (:func:`parse_flags`); ``define_flags``
  (which may define a config flag, whose default config already reads the
  ``--config.`` overrides) runs first under :func:`config_override_errors`."""
  from absl import app
  if define_flags is not None:
    with config_override_errors():
      define_flags()
  app.run(main, flags_parser=parse_flags)


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path next to ``path`` to write a file into. When the block
  ends without error the file is renamed onto ``path`` (readers never see half a file)
  with the permissions a newly created file gets (``mkstemp`` makes it readable by its
  owner only); on an error it is removed. The temporary name ends with ``path``'s
  name, so writers that choose the format by extension (.png, .ome.tif) still do."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  os.close(fd)
  try:
    yield tmp
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def atomic_write_text(path: str, text: str) -> None:
  """Writes a text file atomically (:func:`atomic_path`)."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", newline="") as f:
      f.write(text)


def progress(iterable=None, total=None, desc=None, unit="it"):
  """A tqdm progress bar on stderr (disabled when stderr is not a terminal in CI)."""
  from tqdm.auto import tqdm
  return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True,
              disable=None, file=sys.stderr)


def inputs_and_output(flag_values, argv, output_kind: str = "a .csv file") -> list[str]:
  """Inputs from --input (repeatable) plus positional paths (shell globs); checks that
  --output is given, is not a folder and can be written (:func:`check_writable`). Ends
  the command with one line otherwise."""
  inputs = list(flag_values.input) + list(argv[1:])
  output = flag_values.output
  if not output:
    fail(f"--output is required ({output_kind})")
  if not inputs:
    fail("give at least one --input=PATH (TIFF file or folder)")
  if os.path.isdir(output):
    fail(f"--output={output} is a folder; give {output_kind} name")
  check_writable(output)
  return inputs


def workdir_inputs_and_output(flag_values, argv, output_kind: str = "a .csv file"):
  """:func:`inputs_and_output` for tools that apply a trained run: --workdir is
  required too (one line otherwise)."""
  if not flag_values.workdir:
    fail("--workdir is required (a trained run; see --help)")
  return inputs_and_output(flag_values, argv, output_kind)


def inputs_and_output_folder(flag_values, argv, input_kind: str = "TIFF file or folder",
                             output_kind: str = "a folder") -> list[str]:
  """As :func:`inputs_and_output`, for tools that write several files per input into an
  --output folder: checks that it is given, is not an existing file and can be
  written."""
  inputs = list(flag_values.input) + list(argv[1:])
  if not inputs:
    fail(f"give at least one --input=PATH ({input_kind})")
  if not flag_values.output:
    fail(f"--output is required ({output_kind})")
  if os.path.isfile(flag_values.output):
    fail(f"--output={flag_values.output} is a file; give a folder")
  check_writable(flag_values.output, folder=True)
  return inputs


def check_writable(path: str, flag: str = "output", folder: bool = False) -> None:
  """Ends the command with one line unless ``path`` can be written: a file (its folder
  must accept a new file) or, with ``folder=True``, a folder. Missing folders are
  created, a temporary file is written and removed, then the folders created here are
  removed again, so a command that fails later (a bad --workdir) leaves nothing behind.
  Call it before reading inputs or doing any work."""
  target = os.path.abspath(path)
  if folder and os.path.exists(target) and not os.path.isdir(target):
    fail(f"--{flag}={path} is a file; give a folder")
  if not folder and os.path.isdir(target):
    fail(f"--{flag}={path} is a folder; give a file name")
  directory = target if folder else os.path.dirname(target)
  created, existing = [], directory
  while not os.path.exists(existing):
    created.append(existing)
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    fail(f"--{flag}={path} cannot be written: {existing} is a file, not a folder")
  try:
    for d in reversed(created):
      os.mkdir(d)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".write-test-")
    os.close(fd)
    os.unlink(tmp)
  except OSError as e:
    fail(f"--{flag}={path} cannot be written: {e.strerror or e} ({e.filename or directory})")
  finally:
    for d in created:                      # deepest first
      try:
        os.rmdir(d)
      except OSError:
        pass


def config_path(name: str) -> str:
  """The absolute path of ``configs/<name>.py`` of this checkout (the folder next to the
  package), so that config defaults do not depend on the working folder."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(root, "configs", f"{name}.py")


def require_positive(flag_values, names) -> None:
  """Ends the command with '--NAME must be > 0' for the first given flag that is <= 0
  (flags left unset, None, are not checked)."""
  for name in names:
    value = flag_values[name].value
    if value is not None and value <= 0:
      fail(f"--{name} must be > 0")


def require_nonnegative(flag_values, names) -> None:
  """Ends the command with '--NAME must be >= 0' for the first given flag that is < 0
  or NaN (flags left unset, None, are not checked)."""
  for name in names:
    value = flag_values[name].value
    if value is not None and not value >= 0:
      fail(f"--{name} must be >= 0")


def define_channel_flag(what: str = "movies") -> None:
  """--channel: which channel of multi-channel files to read (core.tiff_io.take_channel:
  no default channel, so a multi-channel file without it is an error row)."""
  from absl import flags
  flags.DEFINE_integer("channel", None, f"Channel of multi-channel {what} (0-based; "
                       "required for them; a single-channel file accepts only 0).")


def channel_flag(flag_values) -> int | None:
  """The --channel value (None: not given); a negative one ends the command."""
  require_nonnegative(flag_values, ("channel",))
  return flag_values.channel


def run_or_fail(fn, *args, user_errors=(FileNotFoundError,), **kwargs):
  """Runs a tool's ``run(*args, **kwargs) -> exit code`` and exits with it; the errors a user
  causes (``user_errors``: a missing run or file, a bad flag combination) and an
  unwritable output end the command with one line instead of a traceback."""
  try:
    code = fn(*args, **kwargs)
  except PermissionError as e:
    fail(f"cannot write output: {e}")
  except user_errors as e:
    fail(str(e))
  sys.exit(code)


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
