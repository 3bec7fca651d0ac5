"""The event database: crop folders recorded in SQLite, queried by metadata, split.

  python -m smlm_jax.events.db add FOLDER... [--db=events.db]
  python -m smlm_jax.events.db list [--db=events.db] [--output=events.csv]
  python -m smlm_jax.events.db query "microscope=isim" "stain~staygold" "frames>=5" \
      [--output=events.csv]
  python -m smlm_jax.events.db keys                       # what can be queried
  python -m smlm_jax.events.db delete ID... | CONDITION...
  python -m smlm_jax.events.db split [CONDITION...] --val_fraction=0.2 --seed=0 \
      [--group_by=source_file] [--output=split.json]

Why SQLite (Python's built-in ``sqlite3``): one real database file, no server, no new
dependency, and atomic transactions: every ``add`` / ``delete`` runs in one transaction
(``BEGIN IMMEDIATE`` ... ``COMMIT``), so an exception or a killed process leaves the file
as it was before the command (SQLite's rollback journal is replayed on the next open).
deep-events used MongoDB for the same records; this needs no server.

``add`` takes crop folders (with ``event_db.yaml``, ``images.tif``, ``ground_truth.tif``,
as written by :mod:`.crops` or deep-events) or folders containing them (searched
recursively). An event is identified by (source file, event id) where the id is the
YAML's ``_id`` (else the folder name) and the source its ``source_file`` (else
``original_file``): adding the same folders again updates those records (e.g. a moved
folder) and never duplicates them. A folder with a problem gets one ``error:`` line and
is skipped; the others are added; the exit code is then 1.

Schema (version 2): ``events`` (one row per crop: event_id, source_file, folder, kind =
event | negative, frames, height_px, width_px, pixel_size_nm, frame_interval_s,
structure_snr, usable, metadata = the YAML record as JSON, added) and ``meta`` (pk, key, text, num): every YAML key flattened
(nested keys joined by '.', one row per list element, numbers also as num), plus the
derived columns above under their names. A YAML key that clashes with a derived one is
kept as ``yaml.<key>`` (e.g. deep-events' ``frames: [first, last]`` is
``yaml.frames``; ``frames`` is the crop's frame count read from images.tif). Pixel size
and frame interval come from the YAML's pixel_size_nm / frame_interval_s, else from
deep-events' ``ome.physical_size_x`` (um) / ``ome.time_increment`` (ms).

Unusable crops: ``add`` measures each crop's structure (:func:`.quality.structure_snr`:
contrast of its bright structures in units of its own camera noise) and flags a crop
without structure (camera noise only) ``usable = 0`` with a ``note:`` line; ``query
usable=1`` lists the others, and training (:func:`.data.split_records`) and the study
leave flagged crops out unless asked (``config.data.include_unusable``). A version-1
file gets the two columns on opening (usable until re-added).

Conditions ``KEY OP VALUE`` (all must hold): ``=`` or ``==`` (case-insensitive text, or
numeric equality when VALUE is a number), ``!=`` (no element equal; events without the key
match), ``>=  <=  >  <`` (numeric), ``~`` (substring, case-insensitive). A list-valued
key matches when any element does (``cell_line=cos7`` matches ``cell_line: [cos7]``).
A query that finds nothing says which of its keys no event has (a typo, or see ``keys``).

``split`` assigns each event (or each group of events sharing ``--group_by``, e.g.
source_file: all crops of a movie together) to validation when
``sha256(f"{seed}:{group}")`` as a fraction of 2^256 is below ``val_fraction``: it depends
on nothing but the id and the seed, so events never move between the sets when the
database grows, and all frames of an event are always on one side. The trainer uses the
same function (``config.data``).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import sqlite3
import sys

from smlm_jax.core import cli
from smlm_jax.core.tiff_io import MovieError
from smlm_jax.events import quality

RECORD_FILE = "event_db.yaml"
DERIVED = ("event_id", "source_file", "folder", "kind", "frames", "height_px", "width_px",
           "pixel_size_nm", "frame_interval_s", "structure_snr", "usable")
SCHEMA_VERSION = "2"
# Version 1 lacked the structure check; opening such a file adds the columns (usable
# until re-added, which measures it).
_MIGRATE_FROM_1 = ("ALTER TABLE events ADD COLUMN structure_snr REAL",
                   "ALTER TABLE events ADD COLUMN usable INTEGER NOT NULL DEFAULT 1")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS events (
  pk INTEGER PRIMARY KEY,
  event_id TEXT NOT NULL,
  source_file TEXT NOT NULL,
  folder TEXT NOT NULL,
  kind TEXT NOT NULL,
  frames INTEGER NOT NULL,
  height_px INTEGER NOT NULL,
  width_px INTEGER NOT NULL,
  pixel_size_nm REAL,
  frame_interval_s REAL,
  structure_snr REAL,
  usable INTEGER NOT NULL DEFAULT 1,
  metadata TEXT NOT NULL,
  added TEXT NOT NULL,
  UNIQUE (source_file, event_id));
CREATE TABLE IF NOT EXISTS meta (
  pk INTEGER NOT NULL REFERENCES events(pk) ON DELETE CASCADE,
  key TEXT NOT NULL,
  text TEXT,
  num REAL);
CREATE INDEX IF NOT EXISTS meta_key ON meta (key, text COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS meta_pk ON meta (pk);
"""
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|!=|==|=|>|<|~)\s*(.*?)\s*$")


class DatabaseError(ValueError):
  """A database or query problem; the message says what to do, in one line."""


# ------------------------------------------------------------------- folder records
def _tiff_shape(path: str):
  from smlm_jax.core import tiff_io
  try:
    with tiff_io.open_tiff(path) as tif:
      shape = [n for n in tif.series[0].shape if n > 1] or [1]
  except MovieError:
    raise
  except Exception as e:  # tifffile raises many types for corrupt files
    raise MovieError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
  if len(shape) == 2:
    shape = [1] + shape
  if len(shape) != 3:
    raise MovieError(f"{path}: shape {tuple(shape)}; expected [T, H, W]", "bad_shape")
  return tuple(int(n) for n in shape)


def _number(value):
  try:
    v = float(value)
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def _physical(meta: dict):
  """(pixel size nm, frame interval s) of a record (ours, else deep-events' OME keys)."""
  px = _number(meta.get("pixel_size_nm"))
  dt = _number(meta.get("frame_interval_s"))
  ome = meta.get("ome") if isinstance(meta.get("ome"), dict) else {}
  if px is None and _number(ome.get("physical_size_x")) is not None:
    unit = str(ome.get("physical_size_x_unit", "µm")).replace("\xb5", "u").replace("µ", "u")
    px = _number(ome["physical_size_x"]) * {"nm": 1.0, "um": 1000.0}.get(unit, 1000.0)
  if dt is None and _number(ome.get("time_increment")) is not None:
    unit = str(ome.get("time_increment_unit", "ms"))
    dt = _number(ome["time_increment"]) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}.get(unit, 1e-3)
  return px, dt


def read_yaml_mapping(path: str, where: str | None = None, allow_empty: bool = True) -> dict:
  """A YAML file holding a mapping of keys to values; MovieError in one line when it
  cannot be read (``where`` names it in that message, default the path), is not YAML,
  or holds something else (an empty file is {} when ``allow_empty``)."""
  import yaml
  try:
    with open(path) as f:
      data = yaml.safe_load(f)
  except OSError as e:
    raise MovieError(f"{where or path}: cannot read ({e.strerror})", "not_found") from None
  except yaml.YAMLError as e:
    raise MovieError(f"{path}: not valid YAML ({str(e).splitlines()[0]})",
                     "bad_metadata") from None
  if data is None and allow_empty:
    return {}
  if not isinstance(data, dict):
    raise MovieError(f"{path}: expected a YAML mapping of keys to values", "bad_metadata")
  return data


def read_folder(folder: str) -> dict:
  """The database record of one crop folder; MovieError (one line) if unusable."""
  folder = os.path.abspath(folder)
  path = os.path.join(folder, RECORD_FILE)
  meta = read_yaml_mapping(path, where=f"{folder}: {RECORD_FILE}", allow_empty=False)
  images = os.path.join(folder, "images.tif")
  truth = os.path.join(folder, "ground_truth.tif")
  for p in (images, truth):
    if not os.path.isfile(p):
      raise MovieError(f"{folder}: {os.path.basename(p)} is missing", "not_found")
  shape = _tiff_shape(images)
  if _tiff_shape(truth) != shape:
    raise MovieError(f"{folder}: ground_truth.tif {_tiff_shape(truth)} and images.tif "
                     f"{shape} differ in shape", "wrong_size")
  px, dt = _physical(meta)
  snr = quality.file_structure_snr(images)
  kind = str(meta.get("type") or "event").lower()
  if kind not in ("event", "negative"):
    raise MovieError(f"{path}: type {kind!r}; expected event or negative", "bad_metadata")
  return {"event_id": str(meta.get("_id") or os.path.basename(folder)),
          "source_file": str(meta.get("source_file") or meta.get("original_file") or ""),
          "folder": folder, "kind": kind, "frames": shape[0], "height_px": shape[1],
          "width_px": shape[2], "pixel_size_nm": px, "frame_interval_s": dt,
          "structure_snr": round(snr, 3), "usable": int(quality.usable(snr)),
          "metadata": json.loads(json.dumps(meta, default=str))}


def find_folders(paths):
  """(crop folders, problems [(path, message, code)]): folders with event_db.yaml."""
  folders, problems = [], []
  for p in paths:
    if os.path.isfile(os.path.join(p, RECORD_FILE)):
      folders.append(p)
    elif os.path.isdir(p):
      found = sorted(root for root, _, names in os.walk(p) if RECORD_FILE in names)
      if not found:
        problems.append((p, f"{p}: no crop folders ({RECORD_FILE}) inside", "empty_folder"))
      folders += found
    else:
      problems.append((p, f"{p}: no such folder", "not_found"))
  return folders, problems


def _flatten(value, key, out):
  if isinstance(value, dict):
    for k, v in value.items():
      _flatten(v, f"{key}.{k}" if key else str(k), out)
  elif isinstance(value, (list, tuple)):
    for v in value:
      _flatten(v, key, out)
  elif value is not None:
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    out.append((key, text, float(value) if isinstance(value, bool) else _number(value)))


def meta_rows(record: dict):
  """(key, text, num) rows of a record: YAML keys (clashes as yaml.KEY) + derived."""
  rows = []
  for k, v in record["metadata"].items():
    _flatten(v, f"yaml.{k}" if k in DERIVED else str(k), rows)
  for k in DERIVED:
    _flatten(record[k], k, rows)
  return rows


# ------------------------------------------------------------------------- database
class EventDB:
  """An SQLite event database (created on first use unless ``must_exist``)."""

  def __init__(self, path: str, must_exist: bool = False):
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
      raise DatabaseError(f"--db={path} is a folder; give a database file name")
    if not os.path.isdir(folder):
      raise DatabaseError(f"--db={path}: the folder {folder} does not exist")
    if must_exist and not os.path.isfile(path):
      raise DatabaseError(f"no database at {path}; create it with: python -m "
                          f"smlm_jax.events.db add FOLDER --db={path}")
    self.path = path
    try:
      self.conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
      self.conn.execute("PRAGMA foreign_keys = ON")
      with self.transaction():
        for statement in _SCHEMA.split(";"):
          if statement.strip():
            self.conn.execute(statement)
        self.conn.execute("INSERT OR IGNORE INTO info VALUES ('schema_version', ?)",
                          (SCHEMA_VERSION,))
        version = self.conn.execute(
            "SELECT value FROM info WHERE key = 'schema_version'").fetchone()[0]
        if version == "1":
          for statement in _MIGRATE_FROM_1:
            self.conn.execute(statement)
          self.conn.execute("UPDATE info SET value = ? WHERE key = 'schema_version'",
                            (SCHEMA_VERSION,))
          version = SCHEMA_VERSION
    except sqlite3.DatabaseError as e:
      raise DatabaseError(f"{path}: not an event database ({e})") from None
    if version != SCHEMA_VERSION:
      raise DatabaseError(f"{path}: schema version {version}, this code reads "
                          f"{SCHEMA_VERSION}")

  def close(self):
    self.conn.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  @contextlib.contextmanager
  def transaction(self):
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (then re-raised)."""
    self.conn.execute("BEGIN IMMEDIATE")
    try:
      yield self.conn
    except BaseException:
      self.conn.execute("ROLLBACK")
      raise
    self.conn.execute("COMMIT")

  # ----------------------------------------------------------------------- writing
  def add(self, records) -> dict:
    """Inserts or updates records in ONE transaction; {'added', 'updated', 'unchanged'}."""
    counts = {"added": 0, "updated": 0, "unchanged": 0}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with self.transaction() as c:
      for r in records:
        values = [r[k] for k in DERIVED] + [json.dumps(r["metadata"], sort_keys=True)]
        old = c.execute(f"SELECT pk, {', '.join(DERIVED)}, metadata FROM events "
                        "WHERE source_file = ? AND event_id = ?",
                        (r["source_file"], r["event_id"])).fetchone()
        if old is not None and list(old[1:]) == values:
          counts["unchanged"] += 1
          continue
        pk = c.execute(
            f"INSERT INTO events ({', '.join(DERIVED)}, metadata, added) "
            f"VALUES ({', '.join('?' * (len(DERIVED) + 2))}) "
            "ON CONFLICT (source_file, event_id) DO UPDATE SET "
            + ", ".join(f"{k} = excluded.{k}" for k in DERIVED[2:] + ("metadata",))
            + " RETURNING pk", values + [now]).fetchone()[0]
        c.execute("DELETE FROM meta WHERE pk = ?", (pk,))
        self._insert_meta(c, pk, meta_rows(r))
        counts["updated" if old is not None else "added"] += 1
    return counts

  def _insert_meta(self, c, pk, rows):
    c.executemany("INSERT INTO meta (pk, key, text, num) VALUES (?, ?, ?, ?)",
                  [(pk, k, t, n) for k, t, n in rows])

  def delete(self, ids=(), conditions=()) -> int:
    """Deletes the events with these ids and/or matching all conditions; the count."""
    with self.transaction() as c:
      pks = set()
      if ids:
        for i in ids:
          pks.update(p for (p,) in c.execute("SELECT pk FROM events WHERE event_id = ?", (i,)))
      if conditions:
        pks.update(r["pk"] for r in self.query(conditions))
      c.executemany("DELETE FROM events WHERE pk = ?", [(p,) for p in sorted(pks)])
    return len(pks)

  # ----------------------------------------------------------------------- reading
  def query(self, conditions=(), usable_only: bool = False) -> list[dict]:
    """Records (dicts of the derived columns + 'metadata' + 'pk') matching all
    conditions, in insertion order; with ``usable_only`` none flagged unusable."""
    where, params = (["e.usable = 1"] if usable_only else []), []
    for cond in conditions:
      sql, p = parse_condition(cond)
      where.append(sql)
      params += p
    sql = (f"SELECT pk, {', '.join(DERIVED)}, metadata FROM events e"
           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY pk")
    out = []
    for row in self.conn.execute(sql, params):
      rec = dict(zip(("pk",) + DERIVED, row[:-1]))
      rec["metadata"] = json.loads(row[-1])
      out.append(rec)
    return out

  def keys(self) -> list[tuple[str, int, str]]:
    """(key, number of events having it, example value) of every queryable key."""
    return [tuple(r) for r in self.conn.execute(
        "SELECT key, COUNT(DISTINCT pk), MIN(text) FROM meta GROUP BY key ORDER BY key")]

  def count(self) -> int:
    return self.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]


def parse_condition(text: str):
  """'KEY OP VALUE' -> (SQL predicate on events e, parameters); DatabaseError if bad."""
  m = _CONDITION.match(text)
  if not m:
    raise DatabaseError(f"condition {text!r}: expected KEY OP VALUE with OP one of "
                        "= != >= <= > < ~ (e.g. microscope=isim, frames>=5)")
  key, op, value = m.groups()
  value = value.strip().strip("'\"")
  num = _number(value)
  sub = "EXISTS (SELECT 1 FROM meta m WHERE m.pk = e.pk AND m.key = ? AND {})"
  if op in ("=", "==", "!="):
    pred, params = "m.text = ? COLLATE NOCASE", [value]
    if num is not None:
      pred, params = f"(m.num = ? OR {pred})", [num, value]
    sql = sub.format(pred)
    return (f"NOT {sql}" if op == "!=" else sql), [key] + params
  if op == "~":
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return sub.format("m.text LIKE ? ESCAPE '\\'"), [key, f"%{escaped}%"]
  if num is None:
    raise DatabaseError(f"condition {text!r}: {op} needs a number, got {value!r}")
  return sub.format(f"m.num {op} ?"), [key, num]


# ---------------------------------------------------------------------------- split
def split_fraction(group: str, seed: int) -> float:
  """A number in [0, 1) fixed by (seed, group): sha256 as a fraction of 2^256."""
  digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
  return int.from_bytes(digest, "big") / 2.0 ** 256


def group_of(record: dict, group_by: str | None):
  if not group_by:
    return record["event_id"]
  value = record.get(group_by) if group_by in DERIVED else record["metadata"].get(group_by)
  return record["event_id"] if value in (None, "") else json.dumps(value, sort_keys=True)


def split_events(records, val_fraction: float, seed: int = 0, group_by: str | None = None):
  """(train, val) lists of records: by event (or by group), never by frame."""
  if not 0.0 <= val_fraction <= 1.0:
    raise DatabaseError(f"val_fraction must be in [0, 1], got {val_fraction}")
  train, val = [], []
  for r in records:
    (val if split_fraction(group_of(r, group_by), seed) < val_fraction else train).append(r)
  return train, val


# ----------------------------------------------------------------------------- CLI
TABLE = ("event_id", "kind", "frames", "size_px", "microscope", "cell_line", "stain",
         "event_content", "folder", "usable", "structure_snr")


def _cell(value):
  if isinstance(value, (list, tuple)):
    return ";".join(str(v) for v in value)
  return "" if value is None else str(value)


def table_rows(records):
  return [[r["event_id"], r["kind"], r["frames"], f"{r['height_px']}x{r['width_px']}",
           *(_cell(r["metadata"].get(k)) for k in TABLE[4:8]), r["folder"],
           r["usable"], _cell(r["structure_snr"])]
          for r in records]


def _print_table(records, output=None, extra=None):
  rows = table_rows(records)
  columns = list(TABLE)
  if extra:
    columns.append(extra[0])
    rows = [row + [v] for row, v in zip(rows, extra[1])]
  if output:
    cli.atomic_write_text(output, cli.csv_text(columns, rows))
    print(f"{len(rows)} event(s) -> {output}", file=sys.stderr)
    return
  widths = [max([len(c)] + [len(str(r[i])) for r in rows]) for i, c in enumerate(columns)]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
  for r in rows:
    print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
  print(f"{len(rows)} event(s)", file=sys.stderr)


def cmd_add(db: EventDB, paths) -> int:
  folders, problems = find_folders(paths)
  for _, message, _ in problems:
    print(f"error: {message}", file=sys.stderr)
  records, failed = [], len(problems)
  for folder in cli.progress(folders, desc="reading", unit="folder"):
    try:
      records.append(read_folder(folder))
    except MovieError as e:
      print(f"error: {e}", file=sys.stderr)
      failed += 1
  counts = db.add(records)
  quality.report_unusable(records)
  print(f"{db.path}: {counts['added']} added, {counts['updated']} updated, "
        f"{counts['unchanged']} unchanged, {failed} failed; {db.count()} event(s) in total",
        file=sys.stderr)
  return 1 if failed else 0


def cmd_split(db, conditions, val_fraction, seed, group_by, output) -> int:
  records = db.query(conditions)
  train, val = split_events(records, val_fraction, seed, group_by)
  subset = {r["event_id"]: "train" for r in train} | {r["event_id"]: "val" for r in val}
  if output:
    cli.atomic_write_text(output, json.dumps(
        {"val_fraction": val_fraction, "seed": seed, "group_by": group_by,
         "conditions": list(conditions), "train": [r["event_id"] for r in train],
         "val": [r["event_id"] for r in val]}, indent=1))
  else:
    _print_table(records, extra=("subset", [subset[r["event_id"]] for r in records]))
  print(f"split (seed {seed}, val_fraction {val_fraction:g}"
        + (f", by {group_by}" if group_by else ", by event") + f"): {len(train)} train, "
        f"{len(val)} val" + (f" -> {output}" if output else ""), file=sys.stderr)
  return 0


def _explain_empty(db, conditions):
  """One line per condition whose key no event has (the usual reason for no match)."""
  known = {k for k, _, _ in db.keys()}
  for cond in conditions:
    key = _CONDITION.match(cond).group(1)
    if key not in known:
      print(f"note: no event has the key {key!r} (python -m smlm_jax.events.db keys "
            f"--db={db.path} lists them)", file=sys.stderr)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("db", "events.db", "SQLite database file.")
  flags.DEFINE_string("output", None, "CSV (list, query) or JSON (split) to write.")
  flags.DEFINE_float("val_fraction", 0.2, "split: expected fraction of validation events.")
  flags.DEFINE_integer("seed", 0, "split: seed of the assignment.")
  flags.DEFINE_string("group_by", None, "split: key whose events stay together "
                      "(e.g. source_file); default: each event alone.")


COMMANDS = ("add", "list", "query", "keys", "delete", "split")


def main(argv):
  from absl import flags
  cli.quiet_logs()
  f = flags.FLAGS
  if len(argv) < 2 or argv[1] not in COMMANDS:
    cli.fail(f"give a command: {' | '.join(COMMANDS)} (see --help)")
  command, args = argv[1], argv[2:]
  if f.output and command in ("list", "query", "split"):
    cli.check_writable(f.output)
  try:
    if command == "add":
      if not args:
        cli.fail("add: give crop folders (or folders containing them)")
      with EventDB(f.db) as db:
        sys.exit(cmd_add(db, args))
    with EventDB(f.db, must_exist=True) as db:
      if command == "list":
        _print_table(db.query(), f.output)
      elif command == "query":
        if not args:
          cli.fail("query: give conditions like microscope=isim frames>=5 (or use list)")
        records = db.query(args)
        _print_table(records, f.output)
        if not records:
          _explain_empty(db, args)
      elif command == "keys":
        for key, n, example in db.keys():
          print(f"{key:<40} {n:>6} event(s)   e.g. {example}")
      elif command == "delete":
        if not args:
          cli.fail("delete: give event ids or conditions")
        conds = [a for a in args if _CONDITION.match(a)]
        ids = [a for a in args if not _CONDITION.match(a)]
        n = db.delete(ids, conds)
        print(f"{db.path}: deleted {n} event(s); {db.count()} left", file=sys.stderr)
      elif command == "split":
        sys.exit(cmd_split(db, args, f.val_fraction, f.seed, f.group_by, f.output))
  except DatabaseError as e:
    cli.fail(str(e))
  except sqlite3.OperationalError as e:
    cli.fail(f"{f.db}: {e} (another process writing? try again)")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
