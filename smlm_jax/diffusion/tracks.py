"""Tracks from detections, the model's windows along them, and D per molecule.

* ``link``: trackpy's nearest-neighbour linker (Crocker & Grier 1996 as implemented by
  trackpy, the field's standard Python linker) with gap closing (``memory`` frames a
  molecule may be missed); tracks are cut at steps far beyond their local step size
  (``jump_steps``: one molecule bleaching and another appearing nearby), keeping
  tracks of at least ``min_frames`` detections.
* ``Track``: one molecule's frames and positions, gaps filled by linear interpolation
  for cutting windows (the measured positions stay marked ``valid``).
* ``plan_windows``: T-frame windows along a track starting every ``stride`` frames (the
  last one ends at the track's last frame), each a crop of the model's size whose
  centre is the molecule's position in the window's first frame (as in training, where
  the molecule starts near the centre and moves freely). Flags: ``second_molecule``
  (another track comes within two mask radii of the molecule), ``at_image_edge`` (the
  molecule is within 2 px of the frame border in > 25% of the frames), ``short_track``
  (the track is shorter than T: one window, centred on it in time). Other molecules in
  the crop and the part of the crop outside the frame are replaced by synthetic
  background (``fill_background``) so the model sees one molecule, as in training.
* ``combine``: D per molecule from its windows' Gaussian posteriors of ln D (flat prior
  in ln D, so posteriors multiply like likelihoods). Overlapping windows share frames
  and their errors are correlated: the combination is the generalized least-squares
  mean with correlation rho_ij = max(0, 1 - |start_i - start_j| / T), the overlap
  fraction (the triangular kernel is positive definite). Non-overlapping windows are
  independent and the interval narrows as 1 / sqrt(windows).
* ``classical``: per-track CVE with the motion-blur correction and an MSD fit
  (:mod:`smlm_jax.diffusion.baselines`), on the MLE localizations of the same tracks.
"""
from __future__ import annotations

import dataclasses

import numpy as np

WINDOW_FLAGS_EXCLUDED = ("second_molecule", "at_image_edge", "no_spot", "spot_at_edge")


@dataclasses.dataclass
class Track:
  track_id: int
  frames: np.ndarray          # [n] every frame from first to last (gaps included)
  xy_px: np.ndarray           # [n, 2] positions (interpolated in gaps)
  valid: np.ndarray           # [n] bool: detected and localized in that frame
  photons: np.ndarray         # [n] fitted photons (NaN where not valid)
  background: np.ndarray      # [n] fitted background photons per pixel (NaN where not)

  @property
  def t_start(self) -> int:
    return int(self.frames[0])

  @property
  def t_end(self) -> int:
    return int(self.frames[-1])

  def position(self, frame: int) -> np.ndarray:
    i = int(np.clip(frame - self.t_start, 0, len(self.frames) - 1))
    return self.xy_px[i]


def link(detections, search_range_px: float, memory: int, min_frames: int) -> list[Track]:
  """Tracks from a detection table (pandas DataFrame with columns frame, x, y, ok,
  photons, background): trackpy.link with gap closing, then short stubs dropped."""
  import trackpy
  trackpy.quiet()
  if len(detections) == 0:
    return []
  linked = trackpy.link(detections, search_range=search_range_px, memory=memory,
                        adaptive_stop=max(1.0, 0.3 * search_range_px), adaptive_step=0.9,
                        link_strategy="auto")
  pieces = []
  for _, g in linked.groupby("particle"):
    g = g.sort_values("frame").drop_duplicates("frame")
    cuts = jump_steps(g["x"].to_numpy(), g["y"].to_numpy(), g["frame"].to_numpy())
    pieces += [g.iloc[a:b] for a, b in zip([0] + cuts, cuts + [len(g)])]
  tracks = []
  for g in sorted(pieces, key=lambda g: (int(g["frame"].min()), float(g["x"].iloc[0]))):
    if len(g) < min_frames:
      continue
    frames = np.arange(int(g["frame"].min()), int(g["frame"].max()) + 1)
    f = g["frame"].to_numpy()
    xy = np.stack([np.interp(frames, f, g["x"].to_numpy()),
                   np.interp(frames, f, g["y"].to_numpy())], -1)
    valid = np.zeros(len(frames), bool)
    valid[f - frames[0]] = g["ok"].to_numpy().astype(bool)
    photons = np.full(len(frames), np.nan)
    background = np.full(len(frames), np.nan)
    photons[f - frames[0]] = g["photons"].to_numpy()
    background[f - frames[0]] = g["background"].to_numpy()
    tracks.append(Track(len(tracks) + 1, frames, xy, valid, photons, background))
  return tracks


def jump_steps(x, y, frames, factor: float = 5.0, min_px: float = 1.5, half: int = 4):
  """Indices i where a track should be cut before detection i: the step into it is
  larger than ``factor`` x the local per-axis step sd (robust, from the median of up to
  ``half`` steps on each side) and than ``min_px``. Brownian steps exceed 5 sd with
  probability 4e-6; a link from a bleached molecule to another one appearing nearby
  usually does (the linker only bounds steps by the search range)."""
  d = np.hypot(np.diff(x), np.diff(y)) / np.sqrt(np.maximum(np.diff(frames), 1))
  cuts = []
  for k in range(len(d)):
    around = np.concatenate([d[max(0, k - half):k], d[k + 1:k + 1 + half]])
    if around.size < 3:
      continue
    sd = np.median(around) / 1.1774            # median of a 2D Rayleigh = 1.1774 sd
    if d[k] > max(factor * sd, min_px):
      cuts.append(k + 1)
  return cuts


@dataclasses.dataclass
class Window:
  track_id: int
  first_frame: int
  y0: int                     # crop origin (row, col) in the frame; may lie outside it
  x0: int
  flags: list
  masks: list = dataclasses.field(default_factory=list)   # (frame in window, x, y) in crop px


def window_starts(t_start: int, t_end: int, num_frames: int, stride: int,
                  movie_frames: int) -> tuple[list[int], bool]:
  """First frames of a track's windows, and whether the track is shorter than T."""
  n = t_end - t_start + 1
  if n < num_frames:
    first = int(np.clip(t_start - (num_frames - n) // 2, 0, movie_frames - num_frames))
    return [first], True
  last = t_end - num_frames + 1
  starts = list(range(t_start, last + 1, stride))
  if starts[-1] != last:
    starts.append(last)
  return starts, False


def plan_windows(tracks: list[Track], window_shape, frame_shape, movie_frames: int,
                 stride: int, mask_radius_px: float, detections=None, edge_px: float = 2.0,
                 edge_fraction: float = 0.25) -> list[Window]:
  """The model's windows for every track, with their flags (see module docstring).

  The crop is centred on the molecule's position in the window's first frame even
  near the image border (the part outside the frame is filled with synthetic
  background when cut). Other tracks inside the crop are listed in ``masks`` (to be
  replaced by background within ``mask_radius_px``) unless one comes closer than
  2 mask radii to the molecule: then the window is flagged second_molecule. So are
  the ``detections`` (a table with frame, x, y: spots on no kept track, e.g. a
  molecule seen for a few frames) farther than 2 mask radii from the molecule."""
  t, h, w = window_shape
  H, W = frame_shape
  windows = []
  by_frame = {}
  if detections is not None and len(detections):
    f_all = detections["frame"].to_numpy()
    xy_all = detections[["x", "y"]].to_numpy()
    order = np.argsort(f_all, kind="stable")
    bounds = np.searchsorted(f_all[order], np.arange(movie_frames + 1))
    by_frame = {f: xy_all[order[bounds[f]:bounds[f + 1]]] for f in range(movie_frames)
                if bounds[f + 1] > bounds[f]}
  for tr in tracks:
    starts, short = window_starts(tr.t_start, tr.t_end, t, stride, movie_frames)
    for s in starts:
      x, y = tr.position(s)
      y0, x0 = int(np.floor(y)) - h // 2, int(np.floor(x)) - w // 2
      flags = ["short_track"] if short else []
      own = np.array([tr.position(f) for f in range(s, s + t)])
      alive = (np.arange(s, s + t) >= tr.t_start) & (np.arange(s, s + t) <= tr.t_end)
      near = ((own[:, 0] < edge_px) | (own[:, 0] > W - edge_px)
              | (own[:, 1] < edge_px) | (own[:, 1] > H - edge_px)) & alive
      if near.mean() > edge_fraction:
        flags.append("at_image_edge")
      masks = []
      for other in tracks:
        if other is tr or other.t_end < s or other.t_start > s + t - 1:
          continue
        lo, hi = max(s, other.t_start), min(s + t - 1, other.t_end)
        p = other.xy_px[lo - other.t_start:hi - other.t_start + 1]
        r = mask_radius_px
        inside = ((p[:, 0] >= x0 - r) & (p[:, 0] < x0 + w + r)
                  & (p[:, 1] >= y0 - r) & (p[:, 1] < y0 + h + r))
        if not inside.any():
          continue
        k = np.arange(lo, hi + 1) - s
        d = np.hypot(*(p - own[k]).T)
        if np.any((d < 2 * r) & alive[k]):
          flags.append("second_molecule")
        masks += [(int(kk), float(px - x0), float(py - y0))
                  for kk, (px, py), ins in zip(k, p, inside) if ins]
      r = mask_radius_px
      for k in range(t):
        p = by_frame.get(s + k)
        if p is None:
          continue
        sel = ((p[:, 0] >= x0 - r) & (p[:, 0] < x0 + w + r) & (p[:, 1] >= y0 - r)
               & (p[:, 1] < y0 + h + r) & (np.hypot(*(p - own[k]).T) > 2 * r))
        masks += [(k, float(px - x0), float(py - y0)) for px, py in p[sel]]
      windows.append(Window(tr.track_id, s, y0, x0, list(dict.fromkeys(flags)), masks))
  return windows


def fill_background(window_adu: np.ndarray, masks, radius_px: float, camera, seed: int):
  """Replaces NaN pixels (outside the frame) and discs of ``radius_px`` around the
  ``masks`` (frame, x, y) of a [T, H, W] ADU window by synthetic background: the
  window's median background level with Poisson shot noise and read noise, so the
  model sees one molecule on background as in training. Deterministic per seed."""
  t, h, w = window_adu.shape
  fill = ~np.isfinite(window_adu)
  yy, xx = np.mgrid[0:h, 0:w]
  for k, x, y in masks:
    fill[k] |= (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 < radius_px ** 2
  if not fill.any():
    return window_adu
  real = window_adu[~fill]
  adu_per_e = float(camera.adu_per_electron_in)
  level_e = max((float(np.median(real)) - float(camera.offset_adu)) / adu_per_e, 0.0) \
      if real.size else 0.0
  rng = np.random.default_rng(seed)            # host-side fill, seeded per window
  e = rng.poisson(level_e, int(fill.sum())) + rng.normal(0.0, float(camera.read_noise_e),
                                                          int(fill.sum()))
  out = window_adu.copy()
  out[fill] = float(camera.offset_adu) + adu_per_e * e
  return out


def combine(means, log_vars, starts, num_frames: int):
  """(mean, sd) of ln D for one molecule from its windows' Gaussian posteriors [n].

  Generalized least squares with correlation max(0, 1 - |start_i - start_j| / T)
  between windows (overlapping frames); equals inverse-variance weighting when no
  windows overlap."""
  m = np.asarray(means, np.float64)
  sd = np.sqrt(np.exp(np.clip(np.asarray(log_vars, np.float64), -30, 30)))
  s = np.asarray(starts, np.float64)
  rho = np.maximum(0.0, 1.0 - np.abs(s[:, None] - s[None, :]) / float(num_frames))
  cov = rho * sd[:, None] * sd[None, :] + 1e-12 * np.eye(len(m))
  ones = np.ones(len(m))
  w = np.linalg.solve(cov, ones)
  precision = float(ones @ w)
  return float(w @ m / precision), float(np.sqrt(1.0 / precision))


def consistent_windows(means, log_vars, starts=None, num_frames: int = 1,
                       z_max: float = 3.5):
  """Indices of the windows kept (3 or more windows): those whose ln D lies within z_max
  sd of the windows' median (sd = sqrt(own variance + median variance)). The median is
  over windows at least T/2 frames apart (an overlapping pair, such as the last window
  aligned to the track's end, votes once). A window that spans a linking error or an
  unseen second molecule is such an outlier; confident bad windows cannot outweigh the
  rest as they do in a weighted mean."""
  m = np.asarray(means, np.float64)
  var = np.exp(np.clip(np.asarray(log_vars, np.float64), -30, 30))
  if len(m) < 3:
    return list(range(len(m)))
  votes, last = [], None
  for i in np.argsort(starts if starts is not None else np.arange(len(m)), kind="stable"):
    s = starts[i] if starts is not None else i * num_frames
    if last is None or s - last >= num_frames / 2:
      votes.append(i)
      last = s
  keep = np.abs(m - np.median(m[votes])) <= z_max * np.sqrt(var + np.median(var))
  return list(np.nonzero(keep)[0]) if keep.any() else list(range(len(m)))


def msd_fit_short_lags(positions_nm, valid, frame_interval_s: float, R: float,
                       max_lag: int = 4) -> float:
  """D (um^2/s) from an unweighted fit of MSD(n dt) = 4 D dt (n - 2R) + 4 sigma^2 over
  lags 1..min(max_lag, N/2) (the usual few-point MSD fit; baselines.msd_fit chooses the
  lags optimally but its table costs O(N^4) for long tracks)."""
  p = np.asarray(positions_nm, np.float64)
  v = np.asarray(valid, bool)
  n = len(p)
  lags, msd = [], []
  for k in range(1, max(2, min(max_lag, n // 2)) + 1):
    ok = v[k:] & v[:-k]
    if ok.sum() >= 2:
      lags.append(k)
      msd.append(np.mean(np.sum((p[k:] - p[:-k])[ok] ** 2, -1)))
  if len(lags) < 2:
    return float("nan")
  slope = np.polyfit(np.array(lags, float), np.array(msd), 1)[0]
  return float(slope / (4 * frame_interval_s) * 1e-6)


def _cve_tracks(pos, val, frame_interval_s, R):
  import jax
  from smlm_jax.diffusion import baselines
  global _CVE_JIT
  if _CVE_JIT is None:
    _CVE_JIT = jax.jit(lambda p, v, dt, r: jax.vmap(lambda a, b: baselines.cve(a, b, dt, r))(
        p, v), static_argnums=(2, 3))
  return _CVE_JIT(pos, val, frame_interval_s, R)


_CVE_JIT = None


def classical(tracks: list[Track], pixel_size_nm: float, frame_interval_s: float,
              exposure_s: float) -> dict[int, dict]:
  """{track_id: D_cve, D_msd, localization_sd_nm} on the tracks' MLE localizations:
  CVE with the blur coefficient R = t_exp / (6 dt) (baselines.cve) and the MSD fit."""
  import jax
  import jax.numpy as jnp
  from smlm_jax.diffusion import baselines
  R = min(exposure_s / (6 * frame_interval_s), 1.0 / 6)
  out = {}
  if not tracks:
    return out
  n_max = max(len(t.frames) for t in tracks)
  size = 1 << max(4, (n_max - 1).bit_length())   # few compiled sizes
  pos = np.zeros((len(tracks), size, 2), np.float32)
  val = np.zeros((len(tracks), size), bool)
  for i, t in enumerate(tracks):
    pos[i, :len(t.frames)] = t.xy_px * pixel_size_nm
    val[i, :len(t.frames)] = t.valid
  D, s2, _ = jax.device_get(_cve_tracks(jnp.asarray(pos), jnp.asarray(val),
                                         float(frame_interval_s), float(R)))
  for i, t in enumerate(tracks):
    out[t.track_id] = {
        "D_cve_um2_per_s": float(D[i]),
        "D_msd_um2_per_s": msd_fit_short_lags(t.xy_px * pixel_size_nm, t.valid,
                                              frame_interval_s, R),
        "localization_sd_nm": float(np.sqrt(max(float(s2[i]), 0.0)))
        if np.isfinite(s2[i]) else float("nan")}
  return out
