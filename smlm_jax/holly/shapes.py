"""Point clouds in and out: Wavefront .obj, Stanford .ply, .stl and .off; normalized units.

Reading: ``read_shape(path) -> Shape(vertices [V, 3] float64, faces [F, k] int | None)``
for ``.obj`` (``v x y z`` lines; ``f`` lines with ``i``, ``i/t``, ``i/t/n`` or ``i//n``
indices, 1-based or negative/relative) and ``.ply`` (ASCII, binary little- and
big-endian; the ``vertex`` element's ``x y z`` properties and the ``face`` element's
index list), ``.stl`` (binary or ASCII; the distinct triangle corners are the vertices)
and ``.off`` (plain OFF). Anything unusable raises :class:`ShapeError` with a one-line
message.

Normalized units (the units of every learned cloud and of the renderer): a shape is
centred on the midpoint of its axis-aligned bounding box and scaled so that its
farthest point lies at radius 1 (the unit ball). The renderer maps the unit ball into
the image (see :mod:`smlm_jax.holly.render`), so every pose of a normalized shape is
in the field of view. ``normalize`` returns the centre and scale used, so
``original = normalized * scale + centre``.

Writing: ``write_ply`` (ASCII, vertices and optional faces) and ``write_obj``, both
atomic (temporary file + rename), with a comment line saying what the units are.
"""
from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

from smlm_jax.core import cli


class ShapeError(ValueError):
  """A shape file that cannot be used (missing, corrupt, no vertices); one-line message."""


@dataclasses.dataclass
class Shape:
  vertices: np.ndarray            # [V, 3] float64
  faces: np.ndarray | None = None  # [F, k] int (0-based), or None


def read_shape(path: str) -> Shape:
  """Vertices (and faces) of a .obj, .ply, .stl or .off file; ShapeError when unusable."""
  if not os.path.exists(path):
    raise ShapeError(f"{path}: no such file")
  if os.path.isdir(path):
    raise ShapeError(f"{path}: is a folder, not a .obj/.ply/.stl/.off file")
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext == ".obj":
      shape = _read_obj(path)
    elif ext == ".ply":
      shape = _read_ply(path)
    elif ext == ".stl":
      shape = _read_stl(path)
    elif ext == ".off":
      shape = _read_off(path)
    else:
      raise ShapeError(f"{path}: unknown shape format {ext!r} (use .obj, .ply, .stl or "
                       ".off)")
  except ShapeError:
    raise
  except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
    raise ShapeError(f"{path}: corrupt shape file ({e})") from None
  v = shape.vertices
  if v.ndim != 2 or v.shape[0] == 0:
    raise ShapeError(f"{path}: no vertices")
  if not np.all(np.isfinite(v)):
    raise ShapeError(f"{path}: non-finite vertex coordinates")
  if shape.faces is not None and shape.faces.size and (
      shape.faces.min() < 0 or shape.faces.max() >= len(v)):
    raise ShapeError(f"{path}: face indices out of range 1..{len(v)}")
  return shape


def _read_obj(path: str) -> Shape:
  verts, faces = [], []
  with open(path, encoding="utf-8", errors="strict") as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if parts[0] == "v":
        if len(parts) < 4:
          raise ShapeError(f"{path}:{lineno}: vertex line needs 3 coordinates")
        try:
          verts.append([float(x) for x in parts[1:4]])
        except ValueError:
          raise ShapeError(f"{path}:{lineno}: bad vertex coordinates") from None
      elif parts[0] == "f":
        idx = []
        for p in parts[1:]:
          try:
            i = int(p.split("/")[0])
          except ValueError:
            raise ShapeError(f"{path}:{lineno}: bad face index {p!r}") from None
          idx.append(i - 1 if i > 0 else len(verts) + i)
        if len(idx) >= 3:
          faces.append(idx)
  v = np.asarray(verts, np.float64).reshape(-1, 3)
  return Shape(v, _face_array(faces))


def _read_stl(path: str) -> Shape:
  """STL, binary or ASCII: triangles whose corners repeat; the distinct corners are the
  vertices (exact duplicates merged, in order of first appearance)."""
  with open(path, "rb") as f:
    data = f.read()
  n = int.from_bytes(data[80:84], "little") if len(data) >= 84 else -1
  if n >= 0 and len(data) == 84 + 50 * n:                    # binary: size matches
    rec = np.dtype([("normal", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    corners = np.frombuffer(data, rec, count=n, offset=84)["v"].reshape(-1, 3)
  elif data.lstrip()[:5].lower() == b"solid":
    rows = [line.split()[1:4] for line in data.decode("ascii").splitlines()
            if line.strip().lower().startswith("vertex")]
    if any(len(r) != 3 for r in rows):
      raise ShapeError(f"{path}: STL vertex line needs 3 coordinates")
    corners = np.asarray(rows, np.float64).reshape(-1, 3)
    if len(corners) % 3:
      raise ShapeError(f"{path}: STL has {len(corners)} corners, not whole triangles")
  else:
    raise ShapeError(f"{path}: not an STL file (binary size does not match its "
                     "triangle count, and no ASCII 'solid')")
  v, first, inverse = np.unique(np.asarray(corners, np.float64), axis=0,
                                return_index=True, return_inverse=True)
  order = np.argsort(first)                  # vertices in order of first appearance
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  faces = rank[np.asarray(inverse).reshape(-1)].reshape(-1, 3)
  return Shape(v[order], faces if len(faces) else None)


def _read_off(path: str) -> Shape:
  """OFF (Princeton shape benchmark): 'OFF', 'V F E', V vertex lines, F faces 'k i..'."""
  with open(path, encoding="utf-8", errors="strict") as f:
    tokens = [t for line in f for t in line.split("#")[0].split()]
  if not tokens or not tokens[0].upper().endswith("OFF"):
    raise ShapeError(f"{path}: not an OFF file (no 'OFF' magic)")
  if tokens[0].upper() != "OFF":               # 'COFF', 'NOFF', ...: extra columns
    raise ShapeError(f"{path}: OFF variant {tokens[0]!r} not supported (plain OFF only)")
  nv, nf = int(tokens[1]), int(tokens[2])
  pos = 4
  v = np.asarray(tokens[pos:pos + 3 * nv], np.float64).reshape(nv, 3)
  pos += 3 * nv
  faces = []
  for _ in range(nf):
    k = int(tokens[pos])
    faces.append([int(t) for t in tokens[pos + 1:pos + 1 + k]])
    pos += 1 + k
  return Shape(v, _face_array(faces))


def _face_array(faces):
  if not faces:
    return None
  k = max(len(f) for f in faces)
  if all(len(f) == k for f in faces):
    return np.asarray(faces, np.int64)
  tris = [[f[0], f[i], f[i + 1]] for f in faces for i in range(1, len(f) - 1)]
  return np.asarray(tris, np.int64)       # mixed polygons: fan-triangulated


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2",
              "int16": "i2", "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4",
              "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4",
              "double": "f8", "float64": "f8"}


def _read_ply(path: str) -> Shape:
  with open(path, "rb") as f:
    data = f.read()
  if not data.startswith(b"ply"):
    raise ShapeError(f"{path}: not a PLY file (no 'ply' magic)")
  end = data.find(b"end_header")
  if end < 0:
    raise ShapeError(f"{path}: PLY header has no end_header")
  body_start = data.index(b"\n", end) + 1
  header = data[:end].decode("ascii").splitlines()
  fmt, elements = None, []
  for line in header[1:]:
    parts = line.split()
    if not parts or parts[0] in ("comment", "obj_info"):
      continue
    if parts[0] == "format":
      fmt = parts[1]
    elif parts[0] == "element":
      elements.append((parts[1], int(parts[2]), []))
    elif parts[0] == "property":
      if not elements:
        raise ShapeError(f"{path}: PLY property before any element")
      if parts[1] == "list":
        elements[-1][2].append((parts[4], ("list", _PLY_TYPES[parts[2]],
                                           _PLY_TYPES[parts[3]])))
      else:
        elements[-1][2].append((parts[2], _PLY_TYPES[parts[1]]))
  if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
    raise ShapeError(f"{path}: unsupported PLY format {fmt!r}")
  if fmt == "ascii":
    values = {name: v for name, v in _ply_ascii(data[body_start:], elements)}
  else:
    values = {name: v for name, v in _ply_binary(data[body_start:], elements,
                                                 "<" if fmt.endswith("little_endian") else ">")}
  if "vertex" not in values:
    raise ShapeError(f"{path}: PLY has no vertex element")
  vprops = values["vertex"]
  if not all(k in vprops for k in "xyz"):
    raise ShapeError(f"{path}: PLY vertex element lacks x, y or z")
  v = np.stack([np.asarray(vprops[k], np.float64) for k in "xyz"], axis=1)
  faces = None
  if "face" in values:
    lists = [p for k, p in values["face"].items() if k in ("vertex_indices", "vertex_index")]
    if lists:
      faces = _face_array([list(map(int, f)) for f in lists[0]])
  return Shape(v, faces)


def _ply_ascii(body: bytes, elements):
  tokens = body.decode("ascii").split()
  pos = 0
  for name, count, props in elements:
    out = {p[0]: [] for p in props}
    for _ in range(count):
      for pname, ptype in props:
        if isinstance(ptype, tuple):
          n = int(tokens[pos])
          out[pname].append([float(t) for t in tokens[pos + 1:pos + 1 + n]])
          pos += 1 + n
        else:
          out[pname].append(float(tokens[pos]))
          pos += 1
    yield name, out


def _ply_binary(body: bytes, elements, endian: str):
  pos = 0
  for name, count, props in elements:
    if all(not isinstance(p[1], tuple) for p in props):    # fixed record: one read
      dtype = np.dtype([(p[0], endian + p[1]) for p in props])
      arr = np.frombuffer(body, dtype, count=count, offset=pos)
      pos += dtype.itemsize * count
      yield name, {p[0]: arr[p[0]] for p in props}
      continue
    out = {p[0]: [] for p in props}
    for _ in range(count):
      for pname, ptype in props:
        if isinstance(ptype, tuple):
          ct, it = np.dtype(endian + ptype[1]), np.dtype(endian + ptype[2])
          n = int(np.frombuffer(body, ct, count=1, offset=pos)[0])
          pos += ct.itemsize
          out[pname].append(np.frombuffer(body, it, count=n, offset=pos))
          pos += it.itemsize * n
        else:
          dt = np.dtype(endian + ptype)
          out[pname].append(np.frombuffer(body, dt, count=1, offset=pos)[0])
          pos += dt.itemsize
    yield name, out


def normalize(vertices) -> tuple[np.ndarray, np.ndarray, float]:
  """(normalized [V, 3], centre [3], scale): centred on the bounding-box midpoint and
  scaled so the farthest vertex is at radius 1; original = normalized * scale + centre."""
  v = np.asarray(vertices, np.float64)
  centre = 0.5 * (v.min(0) + v.max(0))
  scale = float(np.max(np.linalg.norm(v - centre, axis=1)))
  if not scale > 0:
    raise ShapeError("shape has a single distinct point; cannot normalize")
  return (v - centre) / scale, centre, scale


def load_normalized(path: str, max_sites: int = 0, seed: int = 0) -> np.ndarray:
  """Vertices of a shape file in normalized units (float32 [V, 3]); with ``max_sites``
  > 0 and more vertices than that, a seeded uniform subset of ``max_sites`` of them (in
  file order; normalized on all of them, so the units do not depend on the subset)."""
  return subsample(normalize(read_shape(path).vertices)[0].astype(np.float32),
                   max_sites, seed)


def subsample(points, max_sites: int = 0, seed: int = 0) -> np.ndarray:
  """``points`` [V, 3], or a seeded uniform subset of ``max_sites`` of them (in their
  order) when there are more and ``max_sites`` > 0."""
  if max_sites > 0 and len(points) > max_sites:
    keep = np.sort(np.random.default_rng(seed).choice(len(points), int(max_sites),
                                                      replace=False))
    points = points[keep]
  return points


def bbox_diagonal(vertices) -> float:
  v = np.asarray(vertices, np.float64)
  return float(np.linalg.norm(v.max(0) - v.min(0)))


_UNITS = ("normalized units: centred on the bounding-box midpoint, farthest point at "
          "radius 1 (the renderer's unit ball)")


def ply_text(vertices, faces=None, comment: str = _UNITS) -> str:
  v = np.asarray(vertices, np.float64)
  lines = ["ply", "format ascii 1.0", f"comment {comment}", f"element vertex {len(v)}",
           "property float x", "property float y", "property float z"]
  if faces is not None and len(faces):
    lines += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
  lines.append("end_header")
  lines += [f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in v]
  if faces is not None:
    lines += [" ".join([str(len(f))] + [str(int(i)) for i in f]) for f in faces]
  return "\n".join(lines) + "\n"


def obj_text(vertices, faces=None, comment: str = _UNITS) -> str:
  v = np.asarray(vertices, np.float64)
  lines = [f"# {comment}", f"# vertices: {len(v)}"]
  lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in v]
  if faces is not None:
    lines += ["f " + " ".join(str(int(i) + 1) for i in f) for f in faces]
  return "\n".join(lines) + "\n"


def write_ply(path: str, vertices, faces=None, comment: str = _UNITS) -> str:
  cli.atomic_write_text(path, ply_text(vertices, faces, comment))
  return path


def write_obj(path: str, vertices, faces=None, comment: str = _UNITS) -> str:
  cli.atomic_write_text(path, obj_text(vertices, faces, comment))
  return path
