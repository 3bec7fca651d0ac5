"""Where a trained sparks run's false events come from, on annotated movies of an
independent simulator (diagnosis only: nothing here is used to train or choose).

  python experiments/sparks_false_events.py --workdir=RUN --second_sim_dir=DIR \
      [--cls=spark --cls=puff] [--out=false_events.json]

The run segments each DIR/NAME.tif exactly as ``experiments/sparks_study.py
--second_sim_dir`` scores it (the run's event extraction and confidence filter, IoMin
>= 0.5 matching with ignore voxels removed). Every scored prediction of class --cls that
is not matched to a true event of its class (default: sparks and puffs) is put in one cause, the first that holds:
  on_<class>    it overlaps a true event of another class at IoMin >= 0.5 (a true event
                called the wrong class),
  part_<class>  it overlaps a labelled true event at lower IoMin (a fragment, or a
                component that merged it with more),
  unlabelled    no labelled voxel, but the simulator's metadata (NAME.json 'events')
                lists an event within 3 um and 100 ms of its peak (e.g. out of focus:
                drawn, never labelled),
  none          no event there (noise, cell structure, bleaching).
Prints, per cause, the count and the medians of duration (ms), projected area (um^2),
estimated peak dF/F0, mean class probability, and the local resting signal relative to
the movie's cell median (F0 ratio: < 1 at a cell edge or a dim nucleus), next to the
same numbers for the matched (true positive) predictions and the training prior of
the class; ends with a RESULT line of the counts.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import json  # noqa: E402

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from smlm_jax.core import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained run folder.")
_DIR = flags.DEFINE_string("second_sim_dir", None, "Annotated movies (sparks_study's format).")
_CLS = flags.DEFINE_multi_enum("cls", ["spark", "puff"], ["spark", "wave", "puff"],
                               "Predicted classes (repeat the flag).")
_OUT = flags.DEFINE_string("out", None, "Write every false event as JSON here.")
NAMES = {1: "spark", 2: "wave", 3: "puff"}


def _items(folder):
  """[(stem, movie, labels, instances or None, metadata)] as sparks_study reads them."""
  out = []
  for name in sorted(os.listdir(folder)):
    stem = name[:-5]
    if name.endswith(".json") and os.path.exists(os.path.join(folder, stem + ".tif")):
      inst = os.path.join(folder, stem + "_instances.tif")
      out.append((stem, os.path.join(folder, stem + ".tif"),
                  os.path.join(folder, stem + "_labels.tif"),
                  inst if os.path.exists(inst) else None,
                  json.load(open(os.path.join(folder, name)))))
  if not out:
    cli.fail(f"--second_sim_dir={folder}: no NAME.json with NAME.tif found")
  return out


def _near_event(events, e, px_um, dt_ms):
  """The metadata event nearest to predicted event ``e`` within 3 um and 100 ms."""
  best, dmin = None, np.inf
  for ev in events:
    if "y_px" not in ev:
      continue
    d_um = np.hypot(ev["y_px"] - e.y_px, ev["x_px"] - e.x_px) * px_um
    t = ev.get("t_peak_frame", None)
    in_time = t is None or (e.t_start - 100 / dt_ms <= t <= e.t_end + 100 / dt_ms)
    if d_um <= 3.0 and in_time and d_um < dmin:
      best, dmin = ev, d_um
  return best


def analyse(workdir, folder, classes):
  from smlm_jax.core import tiff_io
  from smlm_jax.sparks import events as events_lib, predict as predict_lib
  from smlm_jax.sparks.events import extraction, matching
  items = _items(folder)
  meta0 = items[0][4]
  seg = predict_lib.Segmenter(workdir, camera_offset_adu=float(
      meta0.get("camera_offset_adu", 100.0)))
  print(seg.filter_note)
  px_um, dt_ms = float(meta0["pixel_size_nm"]) / 1000, float(meta0["frame_interval_s"]) * 1000
  spec = events_lib.spec_from_config(seg.config, px_um, dt_ms)
  rows = []
  for stem, mpath, lpath, ipath, meta in items:
    image = predict_lib.read_movie(mpath, float(seg.camera.offset_adu))
    lab = np.asarray(tiff_io.read_image(lpath).data, np.int64)
    tinst, tcls = extraction.annotated_instances(
        lab, None if ipath is None else tiff_io.read_image(ipath).data)
    probs, x, _ = seg.probabilities(image.data, desc=stem)
    movie = x[..., 0]
    _, inst, cls_of, events, _ = extraction.extract_events(probs, movie, spec)
    ignore = extraction.filter_true_instances(lab, tinst, tcls, spec)
    m = matching.match_events(tinst, tcls, inst, cls_of, ignore, spec.iomin_threshold)
    _, _, pairs, iomin = matching.overlaps(tinst, tcls, inst, cls_of, ignore,
                                           spec.iomin_threshold)
    f0 = np.median(np.asarray(image.data, np.float32), axis=0)
    cell = np.median(f0[f0 > np.percentile(f0, 30)])
    pmean, _ = events_lib.event_confidence(inst, cls_of, probs, spec)
    for e in events:
      if NAMES[e.cls] not in classes or e.event_id not in m["pred_matched"]:
        continue
      sel = pairs[:, 1] == e.event_id
      ov = [(float(iomin[k]), int(pairs[k, 0])) for k in np.nonzero(sel)[0]]
      ov.sort(reverse=True)
      cause = None
      if m["pred_matched"][e.event_id]:
        cause = "matched"
      elif ov and ov[0][0] >= spec.iomin_threshold:
        cause = "on_" + NAMES[int(tcls[ov[0][1]])]
      elif ov:
        cause = "part_" + NAMES[int(tcls[ov[0][1]])]
      near = _near_event(meta.get("events", []), e, px_um, dt_ms)
      if cause is None:
        cause = "none" if near is None else "unlabelled"
      rows.append(dict(movie=stem, cls=NAMES[e.cls], cause=cause, duration_ms=e.duration_ms,
                       area_um2=e.area_um2, amplitude=e.amplitude,
                       pmean=float(pmean[e.event_id]),
                       f0_ratio=float(f0[int(e.y_px), int(e.x_px)] / cell),
                       t_start=e.t_start, y_px=e.y_px, x_px=e.x_px,
                       dye=meta.get("dye"), f0_photons=meta.get("f0_cytosol_e_per_px_frame"),
                       near_event={k: near.get(k) for k in ("id", "class", "peak_dF_F0",
                                                            "duration_ms", "n_voxels",
                                                            "dz_um", "release_ms")}
                       if near else None))
  return rows, seg.config


def table(rows, cls, prior):
  keys = ("duration_ms", "area_um2", "amplitude", "pmean", "f0_ratio")
  lines = [f"predicted {cls}s by cause (medians; 10-90th percentiles of duration and "
           f"dF/F0)",
           f"{'cause':14s} {'n':>4s} " + " ".join(f"{k:>11s}" for k in keys)
           + "   duration p10-p90   dF/F0 p10-p90"]
  causes = sorted({r["cause"] for r in rows}, key=lambda c: (c != "matched", c))
  for c in causes:
    sub = [r for r in rows if r["cause"] == c]
    med = [np.median([r[k] for r in sub]) for k in keys]
    d = np.percentile([r["duration_ms"] for r in sub], [10, 90])
    a = np.percentile([r["amplitude"] for r in sub], [10, 90])
    lines.append(f"{c:14s} {len(sub):4d} " + " ".join(f"{v:11.2f}" for v in med)
                 + f"   {d[0]:6.0f}-{d[1]:<6.0f}       {a[0]:.2f}-{a[1]:.2f}")
  lines.append(f"training prior of the class: {prior}")
  return "\n".join(lines)


def main(argv):
  del argv
  cli.quiet_logs()
  if not _WORKDIR.value or not os.path.isdir(os.path.join(_WORKDIR.value, "checkpoints")):
    cli.fail(f"--workdir={_WORKDIR.value}: no trained run there")
  if not _DIR.value or not os.path.isdir(_DIR.value):
    cli.fail(f"--second_sim_dir={_DIR.value}: not a folder")
  rows, cfg = analyse(_WORKDIR.value, _DIR.value, set(_CLS.value))
  counts = {}
  for name in _CLS.value:
    p = cfg.sim[name + "s"]
    prior = ", ".join(f"{k}={tuple(v) if isinstance(v, (list, tuple)) else v}"
                      for k, v in p.items())
    sub = [r for r in rows if r["cls"] == name]
    if sub:
      print(table(sub, name, prior))
    for r in sub:
      counts[f"{name}_{r['cause']}"] = counts.get(f"{name}_{r['cause']}", 0) + 1
  print("false events per movie (dye, resting photons per pixel per frame):")
  for stem in sorted({r["movie"] for r in rows}):
    sub = [r for r in rows if r["movie"] == stem]
    n = " ".join(f"{c}={sum(r['cls'] == c and r['cause'] != 'matched' for r in sub)}"
                 for c in _CLS.value)
    print(f"  {stem} {sub[0]['dye']} F0={sub[0]['f0_photons']} {n}")
  if _OUT.value:
    cli.atomic_write_text(_OUT.value, json.dumps(rows, indent=1))
  print("RESULT " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
