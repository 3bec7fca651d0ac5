"""Every command-line tool against the same bad inputs (issue 28).

One set of bad inputs - a missing path, an empty folder, a corrupt file, a truncated
file, an RGB image, NaN values, a constant movie, values below the camera offset, a
movie too small for the model - next to one good file, and an output that cannot be
written (its parent is a file). Asserted for each tool: no traceback (a Python
exception would fail the test), the exit code (2 for a user mistake that stops the
command, 1 when some inputs failed and the others were processed), exactly one
``error:`` line per bad input with its code in the output table, the good file
processed, and no leftover files or folders.

Speed: the tools run in-process (their absl ``main`` with freshly defined and parsed
flags), so JAX is imported once. The input sweep replaces each tool's trained model by
a stub with the same interface (the real networks are exercised by each system's own
tests): what is tested here is everything around the model - output checks first,
reading, plausibility checks, error rows, exit codes.
"""
import contextlib
import importlib
import io
import os
import sys
import types

from absl import flags
import numpy as np
import pytest
import tifffile

from smlm_jax.core import tiff_io

FLAGS = flags.FLAGS


def run_cli(module_name, *args):
  """(exit code, stderr) of ``python -m module_name args`` run in this process."""
  module = importlib.import_module(module_name)
  before = set(FLAGS)
  saved_argv, sys.argv = sys.argv, [module_name, *args]  # config flags read overrides here
  err = io.StringIO()
  code = 0
  try:
    module._define_flags()
    argv = FLAGS(sys.argv)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      try:
        module.main(argv)
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    sys.argv = saved_argv
    for name in set(FLAGS) - before:       # also config override flags made by parsing
      delattr(FLAGS, name)
    FLAGS.unparse_flags()
  return code, err.getvalue()


def _errors(stderr):
  return [l for l in stderr.splitlines() if l.startswith("error:")]


def _files(folder):
  return sorted(os.path.relpath(os.path.join(d, n), folder)
                for d, dirs, names in os.walk(folder) for n in names + dirs)


# ------------------------------------------------------------------ outputs first
@pytest.fixture()
def blocked(tmp_path):
  """(a path whose parent is a regular file, an existing folder that is no run)."""
  (tmp_path / "afile").write_text("x")
  (tmp_path / "norun").mkdir()
  return str(tmp_path / "afile" / "out"), str(tmp_path / "norun")


# Each: (module, arguments given the blocked output path O, a folder that is no run W,
# an existing input I), flag named in the message. Without the output check first, W
# (no checkpoints) or I (one frame) would fail later or the work would run.
OUTPUT_CASES = [
    ("smlm_jax.diffusion.predict", "--workdir={W} --input={I} --output={O}/x.csv", "output"),
    ("smlm_jax.diffusion.predict", "--workdir={W} --input={I} --output={T}/x.csv "
                                   "--plot={O}/x.png", "plot"),
    ("smlm_jax.diffusion.baselines", "--input={I} --output={O}/x.csv", "output"),
    ("smlm_jax.diffusion.simulate", "--num_movies=1 --output_dir={O}", "output_dir"),
    ("smlm_jax.events.predict", "--workdir={W} --input={I} --output={O}/x.csv", "output"),
    ("smlm_jax.events.annotate", "--csv={I} --shape=2,8,8 --output={O}/gt.tif", "output"),
    ("smlm_jax.events.crops", "--movie={I} --csv={I} --output_dir={O}", "output_dir"),
    ("smlm_jax.events.db", "list --db={T}/e.db --output={O}/x.csv", "output"),
    ("smlm_jax.sparks.predict", "--workdir={W} --input={I} --output={O}", "output"),
    ("smlm_jax.sparks.evaluate", "--workdir={W} --output={O}", "output"),
    ("smlm_jax.fusion.predict", "--workdir={W} --input={I} --output={O}", "output"),
    ("smlm_jax.fusion.evaluate", "--pred={I} --target={I} --output={O}/x.csv", "output"),
    ("smlm_jax.holly.evaluate", "--workdir={W} --output={O}", "output"),
]


@pytest.mark.parametrize("module,args,flag", OUTPUT_CASES,
                         ids=[f"{c[0].split('.', 1)[1]}-{c[2]}" for c in OUTPUT_CASES])
def test_unwritable_output_is_reported_before_any_work(module, args, flag, blocked,
                                                       tmp_path):
  out, norun = blocked
  image = tmp_path / "one.tif"
  tiff_io.write_image(str(image), np.ones((4, 4), np.uint16), "YX")
  before = _files(tmp_path)
  code, err = run_cli(module, *args.format(O=out, W=norun, I=image, T=tmp_path).split())
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1, err
  assert lines[0].startswith(f"error: --{flag}=") and "cannot be written" in lines[0], err
  assert "afile is a file, not a folder" in lines[0]
  assert _files(tmp_path) == before            # nothing created, nothing left


def test_missing_workdir_leaves_no_output_folder(tmp_path):
  """events.predict used to create the CSV's folder before loading the run."""
  image = tmp_path / "m.tif"
  tiff_io.write_image(str(image), np.ones((3, 16, 16), np.uint16), "TYX")
  for module, out in (("smlm_jax.events.predict", tmp_path / "a" / "b" / "x.csv"),
                      ("smlm_jax.diffusion.predict", tmp_path / "c" / "x.csv"),
                      ("smlm_jax.sparks.predict", tmp_path / "d" / "e"),
                      ("smlm_jax.fusion.predict", tmp_path / "f")):
    code, err = run_cli(module, f"--workdir={tmp_path}/missing_run", f"--input={image}",
                        f"--output={out}")
    assert code == 2 and len(_errors(err)) == 1 and "missing_run" in err, (module, err)
  assert _files(tmp_path) == ["m.tif"]


def test_messages_name_the_missing_path(tmp_path):
  vol = tmp_path / "v.tif"
  tiff_io.write_image(str(vol), np.random.default_rng(0).random((8, 8, 8), np.float32),
                      "ZYX")
  code, err = run_cli("smlm_jax.fusion.evaluate", f"--pred={tmp_path}/MISSING",
                      f"--target={vol}")
  assert code == 2 and _errors(err) == [f"error: --pred={tmp_path}/MISSING: no such file "
                                        "or folder"], err
  code, err = run_cli("smlm_jax.events.db", "add", str(tmp_path),
                      f"--db={tmp_path}/MISSING_DIR/x.db")
  assert code == 2 and "MISSING_DIR does not exist" in err and len(_errors(err)) == 1, err
  assert not os.path.exists(tmp_path / "MISSING_DIR")
  # A query that finds nothing says which key no event has ('==' is '=').
  code, err = run_cli("smlm_jax.events.db", "add", str(tmp_path), f"--db={tmp_path}/e.db")
  code, err = run_cli("smlm_jax.events.db", "query", "microscpe==isim",
                      f"--db={tmp_path}/e.db")
  assert code == 0 and "no event has the key 'microscpe'" in err, err


def test_truncated_movie_is_an_error_for_annotate(tmp_path):
  movie = tmp_path / "movie.tif"
  tiff_io.write_image(str(movie), np.ones((12, 64, 64), np.uint16), "TYX", pixel_size_nm=56.0)
  data = movie.read_bytes()
  (tmp_path / "cut.tif").write_bytes(data[:len(data) // 2])
  (tmp_path / "labels.csv").write_text("axis-0,axis-1,axis-2\n3,10,10\n")
  code, err = run_cli("smlm_jax.events.annotate", f"--csv={tmp_path}/labels.csv",
                      f"--movie={tmp_path}/cut.tif", f"--output={tmp_path}/gt.tif")
  assert code == 2 and len(_errors(err)) == 1 and "truncated" in err, err
  assert not os.path.exists(tmp_path / "gt.tif")


def test_n_ssim_when_the_view_is_the_target(tmp_path):
  from smlm_jax.fusion import metrics
  assert np.isnan(metrics.n_ssim(0.9, 1.0)) and metrics.n_ssim(0.8, 0.6) == pytest.approx(0.5)
  vol = tmp_path / "v.tif"
  tiff_io.write_image(str(vol), np.random.default_rng(0).random((8, 8, 8), np.float32),
                      "ZYX")
  out = tmp_path / "s.csv"
  code, err = run_cli("smlm_jax.fusion.evaluate", f"--pred={vol}", f"--target={vol}",
                      f"--input={vol}", f"--output={out}")
  assert code == 0 and "N_SSIM is undefined" in err, err
  row = out.read_text().splitlines()[-1].split(",")
  assert row[-1] == "input_equals_target" and row[-2] == "" and row[3] == "1.0000"


# ------------------------------------------------------------------ the input sweep
def _write_bad_inputs(folder, good, offset_adu):
  """The shared bad files in ``folder``, shaped like the system's good input ``good``
  [T, H, W] (or [Z, Y, X]); an empty folder next to it."""
  os.makedirs(folder)
  tiff_io.write_image(os.path.join(folder, "good.tif"), good, "TYX")
  data = open(os.path.join(folder, "good.tif"), "rb").read()
  with open(os.path.join(folder, "truncated.tif"), "wb") as f:
    f.write(data[:len(data) // 2])
  with open(os.path.join(folder, "corrupt.tif"), "wb") as f:
    f.write(b"II*\x00" + bytes(range(256)) * 4)
  tifffile.imwrite(os.path.join(folder, "rgb.tif"),
                   np.zeros(good.shape[-2:] + (3,), np.uint8), photometric="rgb")
  nan = good.astype(np.float32)
  nan.flat[5] = np.nan
  tiff_io.write_image(os.path.join(folder, "nan.tif"), nan, "TYX")
  tiff_io.write_image(os.path.join(folder, "constant.tif"),
                      np.full(good.shape, 150, np.uint16), "TYX")
  below = (good.astype(np.float32) - good.mean() + offset_adu - 50.0)
  tiff_io.write_image(os.path.join(folder, "below_offset.tif"), below, "TYX")
  tiff_io.write_image(os.path.join(folder, "too_small.tif"), good[0, :4, :4], "YX")
  os.makedirs(os.path.join(os.path.dirname(folder), "empty"))


class _FakeDiffusion:
  """diffusion.predict.Predictor's interface: D = 1 um^2/s for every window."""

  def __init__(self, workdir, batch_size=None):
    from configs import diffusion
    self.config, self.state, self.camera, self.batch_size = (
        diffusion.get_config("tiny"), {"step": 0}, None, 4)
    s = self.config.sim
    self.window_shape = (s.num_frames, s.height_px, s.width_px)

  def __call__(self, frames):
    z = np.zeros(len(frames), np.float32)
    return {"mean": z, "log_var": z - 2, "photons": z + 1000, "background_photons": z + 10,
            "peak_snr": z + 20, "edge_fraction": z}


def _fake_events(workdir, batch_size=None, tta=False):
  from configs import events
  cfg = events.get_config("tiny")

  def probabilities(frames):
    for f in frames:
      p = np.zeros(f.shape, np.float32)
      p[f.shape[0] // 2, f.shape[1] // 2] = 0.9
      yield p
  return types.SimpleNamespace(config=cfg, n=int(cfg.data.num_frames),
                               probabilities=probabilities)


def _fake_sparks(workdir, *args):
  from configs import sparks
  cfg = sparks.get_config("tiny")

  def probabilities(frames, desc=None):
    probs = np.zeros(frames.shape + (4,), np.float32)
    probs[..., 0] = 1.0
    return probs, np.zeros(frames.shape + (2,), np.float32), types.SimpleNamespace(exact=True)
  return types.SimpleNamespace(config=cfg, state={"step": 0}, filter_note="filter: stub",
                               chunk=64, stride=32,
                               camera=types.SimpleNamespace(offset_adu=100.0),
                               probabilities=probabilities)


def _fake_fusion(workdir, tta=None):
  from configs import fusion
  from smlm_jax.fusion import metrics
  cfg = fusion.get_config("tiny")
  return types.SimpleNamespace(
      config=cfg, state={"step": 0}, voxel_size_um=tuple(cfg.sim.voxel_size_um),
      predict=lambda v, *a, **k: (metrics.percentile_normalize(v), 1))


def _movie(shape, offset=100.0, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.poisson(30.0, shape) + offset).astype(np.uint16)


# system: (module, stub attribute, stub, good input, extra flags, the code of each bad
# input (None: a plausible input for this tool, processed), output kind).
BAD = {"missing.tif": "not_found", "empty": "empty_folder", "corrupt.tif": "unreadable",
       "truncated.tif": "truncated", "rgb.tif": "rgb", "nan.tif": "nan_or_inf",
       "constant.tif": "constant_input", "below_offset.tif": "below_camera_offset"}
SWEEP = {
    "diffusion": ("smlm_jax.diffusion.predict", "Predictor", _FakeDiffusion,
                  (8, 32, 32), "csv", dict(BAD, **{"too_small.tif": "single_frame"})),
    "events": ("smlm_jax.events.predict", "Predictor", _fake_events, (4, 24, 24), "csv",
               dict(BAD, **{"below_offset.tif": None, "too_small.tif": "single_frame",
                            "short.tif": "too_few_frames", "small_frames.tif": "too_small"})),
    "sparks": ("smlm_jax.sparks.predict", "Segmenter", _fake_sparks, (16, 12, 20),
               "folder", dict(BAD, **{"too_small.tif": "single_frame"})),
    "fusion": ("smlm_jax.fusion.predict", "Predictor", _fake_fusion, (8, 12, 12), "folder",
               dict(BAD, **{"below_offset.tif": None, "too_small.tif": "not_3d"})),
}


@pytest.mark.parametrize("system", sorted(SWEEP))
def test_bad_inputs_sweep(system, tmp_path, monkeypatch):
  module_name, attr, fake, shape, kind, expected = SWEEP[system]
  module = importlib.import_module(module_name)
  monkeypatch.setattr(module, attr, fake)
  folder = str(tmp_path / "in")
  _write_bad_inputs(folder, _movie(shape), 100.0)
  if system == "events":      # the tiny run: windows of 3 frames, a depth-2 U-Net (8 px)
    tiff_io.write_image(f"{folder}/short.tif", _movie((2, 24, 24)), "TYX")
    tiff_io.write_image(f"{folder}/small_frames.tif", _movie((3, 6, 6)), "TYX")
  out = tmp_path / "out" / ("result.csv" if kind == "csv" else "result")
  args = [f"--workdir={tmp_path}", f"--output={out}", f"--input={folder}",
          f"--input={tmp_path}/empty", f"--input={tmp_path}/missing.tif"]
  if system == "events":
    args.append("--threshold=0.5")
  code, err = run_cli(module_name, *args)
  errors = _errors(err)
  assert "Traceback" not in err
  bad = {k: v for k, v in expected.items() if v is not None}
  assert code == 1, err
  # One line per bad input, each naming its file.
  assert len(errors) == len(bad), "\n".join(errors)
  for name in bad:
    assert sum(f"/{name}:" in l for l in errors) == 1, (name, errors)
  # The table: the error code of each bad input; the good file (and the plausible ones)
  # processed; nothing flagged ok that is degenerate.
  table = out if kind == "csv" else out / ("summary.csv" if system == "sparks"
                                           else "predict_summary.csv")
  rows = [l.split(",") for l in table.read_text().splitlines() if not l.startswith("#")][1:]
  flag_of = {}
  for r in rows:
    flag_of.setdefault(os.path.basename(r[0].rstrip("/")), set()).add(r[-1])
  for name, code_ in bad.items():
    assert flag_of.get(name) == {f"error:{code_}"}, (name, flag_of)
  processed = [n for n, c in expected.items() if c is None] + ["good.tif"]
  for name in processed:
    assert name in flag_of and not any(f.startswith("error:") for f in flag_of[name]), \
        (name, flag_of)
  # No temporary files; outputs only for processed files.
  left = _files(tmp_path / "out")
  assert not [f for f in left if ".tmp-" in f or ".write-test-" in f], left
  if kind == "folder":
    stems = {f.split("_")[0] for f in _files(out)
             if f not in ("summary.csv", "predict_summary.csv")}
    assert stems <= {n[:-4].split("_")[0] for n in processed}, left


def test_baselines_from_another_folder_with_the_bad_inputs(tmp_path, monkeypatch):
  """The default --config is found from the package (it was relative to the working
  folder); every bad input gets its row and line (no good file: no fit to compile)."""
  folder = str(tmp_path / "in")
  _write_bad_inputs(folder, _movie((8, 32, 32)), 100.0)
  os.remove(os.path.join(folder, "good.tif"))
  monkeypatch.chdir(tmp_path)
  out = tmp_path / "b.csv"
  code, err = run_cli("smlm_jax.diffusion.baselines", f"--input={folder}",
                      f"--input={tmp_path}/empty", f"--input={tmp_path}/missing.tif",
                      f"--output={out}", "--config.sim.num_frames=8")
  expected = dict(BAD, **{"too_small.tif": "single_frame"})
  assert code == 1 and len(_errors(err)) == len(expected), err
  rows = [l.split(",") for l in out.read_text().splitlines() if not l.startswith("#")][1:]
  assert {os.path.basename(r[0]): r[-1] for r in rows} == {
      k: f"error:{v}" for k, v in expected.items()}


@pytest.mark.parametrize("args,says", [
    (["-m", "smlm_jax.train", "--config=configs/holly.py", "--config.loss.typo=1"],
     "no field"),
    (["-m", "smlm_jax.diffusion.simulate", "--config.nope=2"], "no field"),
    # the typo is the second override: the message names it, with ml_collections'
    # suggestion, not the first override
    (["-m", "smlm_jax.train", "--config=configs/holly.py", "--config.batch_size=4",
      "--config.log_every=20"],
     "--config.log_every: the config has no field 'log_every'; did you mean "
     "'log_every_steps'?"),
    (["-m", "smlm_jax.train", "--config.num_train_steps=abc"], "invalid literal")])
def test_bad_config_override_is_one_line(args, says, tmp_path):
  """A --config.FIELD override that names no field (ml_collections raises
  AttributeError, at definition or at parsing) or has a bad value (absl: FATAL, exit
  1) ends with one error line and exit code 2."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, *args, f"--workdir={tmp_path / 'w'}"], cwd=root,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and "--config." in lines[0]
  assert says in lines[0]
  assert not (tmp_path / "w").exists()


def test_sparks_study_missing_simulator_folder_fails_before_training(tmp_path):
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "experiments/sparks_study.py",
                      f"--third_sim_dir={tmp_path / 'nowhere'}",
                      f"--workdir={tmp_path / 'w'}"], cwd=root,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0]
  assert not (tmp_path / "w").exists()
