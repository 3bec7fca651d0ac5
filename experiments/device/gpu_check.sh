#!/bin/bash
# One call on a lent GPU machine (README "Benchmarks", "On a GPU"): every system's
# :gpu config trains a few hundred steps (runs, evaluates, checkpoints; HOLLy's 64-px
# CPU config too), then the diffusion train-step benchmark. Prints a table last; the
# ends of the logs under $OUT. python3 there needs JAX with CUDA; pure-Python packages
# it lacks travel as wheels in .whl/ (pip download --no-deps ml_collections
# tensorboardX orbax-checkpoint). Run from the repository root: bash experiments/device/gpu_check.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p $OUT
export PYTHONPATH=$PWD
if [ -d .whl ]; then   # wheels the machine lacks (ml_collections, tensorboardX, orbax)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys,jax,flax,optax,orbax.checkpoint as o,ml_collections,tifffile;print(sys.version.split()[0],'jax',jax.__version__,'flax',flax.__version__,'optax',optax.__version__,'orbax',o.__version__, jax.devices())"
# smlm_jax.core.host_devices adds an XLA:CPU flag; if this XLA does not know it, drop it.
XLA_FLAGS=--xla_cpu_collective_call_terminate_timeout_seconds=300 python3 -c "import jax; jax.devices()" 2>/dev/null \
  || { echo "XLA lacks the CPU timeout flag: dropped"; sed -i 's/^_TIMEOUT = .*/_TIMEOUT = "--xla_force_host_platform_device_count"/' smlm_jax/core/host_devices.py; }
T0=$(date +%s)
run() {  # name timeout args...
  local name=$1 t=$2; shift 2
  local s=$(date +%s)
  timeout $t python3 -m smlm_jax.train --workdir=/tmp/gpu_$name "$@" > /tmp/log_$name.txt 2>&1; local rc=$?; tail -4 /tmp/log_$name.txt >> $OUT/logs.txt
  echo "$name rc=$rc wall_s=$(( $(date +%s) - s ))" | tee -a $OUT/rc.txt
}
run diffusion 70 --config=configs/diffusion.py:gpu --config.num_train_steps=600 \
  --config.eval_every_steps=600 --config.checkpoint_every_steps=600 --config.log_every_steps=100
run events 60 --config=configs/events.py:gpu --config.num_train_steps=200 \
  --config.eval_every_steps=200 --config.checkpoint_every_steps=200 --config.log_every_steps=50
run sparks 60 --config=configs/sparks.py:gpu --config.num_train_steps=200 \
  --config.eval_every_steps=200 --config.checkpoint_every_steps=200 --config.log_every_steps=50
run fusion 60 --config=configs/fusion.py:gpu --config.num_train_steps=200 \
  --config.eval_every_steps=200 --config.checkpoint_every_steps=200 --config.log_every_steps=50
run holly 80 --config=configs/holly.py:gpu --config.data.obj=experiments/data/holly_shapes/spot.ply --config.num_train_steps=300 \
  --config.eval_every_steps=300 --config.checkpoint_every_steps=300 --config.log_every_steps=50
run holly64 50 --config=configs/holly.py --config.data.obj=experiments/data/holly_shapes/shell.ply --config.num_train_steps=300 --config.restarts.num=1 \
  --config.eval_every_steps=300 --config.checkpoint_every_steps=300 --config.log_every_steps=50
timeout 75 python3 experiments/bench_train.py --config=configs/diffusion.py:gpu --models=locformer,resnet2d --repeats=20 > $OUT/bench_train.log 2>&1
echo "bench_train rc=$?" | tee -a $OUT/rc.txt
python3 - <<'PY'
import json, os, glob
out = os.environ.get("OUT", "/tmp/gpu_out")
print(f"{'system':<10} {'steps':>6} {'steps/s':>8} {'examples/s':>11}  eval")
for name in ["diffusion", "events", "sparks", "fusion", "holly", "holly64"]:
  f = f"/tmp/gpu_{name}/metrics.jsonl"
  if not os.path.exists(f):
    print(f"{name:<10} no metrics"); continue
  rows = [json.loads(l) for l in open(f) if l.strip()]
  tr = [r for r in rows if "steps_per_s" in r]
  ev = [r for r in rows if any(k.startswith("eval/") for k in r)]
  last = tr[-1] if tr else {}
  e = {k: round(v, 4) for k, v in (ev[-1].items() if ev else []) if isinstance(v, float)}
  print(f"{name:<10} {last.get('step', 0):>6} {last.get('steps_per_s', 0):>8.2f} "
        f"{last.get('examples_per_s', 0):>11.1f}  {json.dumps(e)[:300]}")
PY
tail -8 $OUT/bench_train.log
echo "total_s=$(( $(date +%s) - T0 ))"
