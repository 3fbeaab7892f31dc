#!/usr/bin/env bash
# The owed GPU measurements as one device call that fits a 10-minute command limit: each step has
# its own time limit, so one that hangs or runs out of memory costs only its share, and every
# step's output lands in $OUT/gpu_run$PART.log as it runs. Run benchmarks/gpu_wheels.sh here first,
# then, through the device tool with carry [".whl"]:
#   bash benchmarks/gpu_run.sh
# PART=2 and PART=3 run the rest. Each part takes at most 9 minutes: a session's lease is 15
# minutes with the machine's start, so one part a session, in order. A CPU rehearsal at toy sizes:
# SMOKE=1 [PART=2] bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_run}
mkdir -p "$OUT"
if [[ ${SMOKE:-0} != 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
PY=${PY:-python3}

if [[ ${SMOKE:-0} == 1 ]]; then  # the same steps at toy sizes, on CPU
  big=default; mid=tiny; steps=3; extra=(--data.seq_len 64 --batch_size 8)
  blocks=(--batch 2 --seq 64 --d_model 64 --heads 4 --kv_heads 2 --d_ff 128)
else
  big=1b; mid=small; steps=10; extra=()
  blocks=(--batch 4 --seq 256 --d_model 768 --heads 12 --kv_heads 4 --d_ff 2048)  # small's
fi

# At its limit a step gets SIGABRT, on which Python prints every thread's stack (its own
# subprocesses' too: timeout signals the whole process group), so a hang says where it was.
export PYTHONFAULTHANDLER=1
ulimit -c 0  # and writes no core file
step() {  # step SECONDS NAME COMMAND...: run with a limit, log it, go on whatever happens
  local limit=$1 name=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --signal=ABRT --kill-after=5 "$limit" "$@"
  echo "=== $name: rc $? after $((SECONDS - start))s"
}

keep_trace() {  # keep_trace DIR NAME: the newest trace under DIR comes back as $OUT/NAME.xplane.pb
  local trace
  trace=$(ls -t "$1"/plugins/profile/*/*.xplane.pb 2>/dev/null | head -1)
  [[ -n $trace && $(stat -c %s "$trace") -lt 16000000 ]] && cp "$trace" "$OUT/$2.xplane.pb"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  $PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'orbax', o.__version__, jax.devices())"
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 || true
  case ${PART:-1} in
  1)
    # The embedding's gradient now sums in fp32: the profile says whether its scatter left
    # the top of the list (26.3 of 75.1 ms on an H200 in bf16); `1b`'s MFU against the 60 %
    # goal (its 128k x 2048 table had the same scatter) and where its step goes; then `small`
    # against PyTorch.
    step 60 profile_small $PY benchmarks/mfu.py --config $mid --mesh.data=1 --steps $steps \
      --profile /tmp/profile_small "${extra[@]}"
    keep_trace /tmp/profile_small profile_small
    step 150 mfu_1b $PY benchmarks/mfu.py --config $big --mesh.data=1 --steps $steps \
      --profile /tmp/profile_1b "${extra[@]}"
    keep_trace /tmp/profile_1b profile_1b
    step 270 vs_pytorch_small $PY benchmarks/vs_pytorch.py --config $mid --precision bf16 \
      --rounds 3 --cycles 1 "${extra[@]}"
    ;;
  2)
    # HF gradient checkpointing on the torch side, as our dots_no_batch remat (without it
    # torch's eager step ran out of memory); the planner's pick for `1b` against the
    # configured plan; the two attention and SwiGLU forms at `small`'s shapes.
    step 230 vs_pytorch_1b $PY benchmarks/vs_pytorch.py --config $big --rounds 2 \
      --steps_per_round 3 --warmup 2 --cycles 1 "${extra[@]}"
    step 200 planned_1b $PY -m engine.train --config $big --steps 20 --mesh.auto \
      --checkpoint.every=0 --checkpoint.final=False --run_dir /tmp/planned_1b "${extra[@]}"
    step 90 block_kernels $PY benchmarks/block_kernels.py "${blocks[@]}" --dtype bf16
    ;;
  *)
    # Checkpoint writes from a GPU host (its default 3 GB state: `1b`'s 20 GB, saved twice a
    # round beside a raw copy, would fill the machine's 64 GB disk).
    step 200 checkpoint_io $PY benchmarks/checkpoint_io.py --rounds 2 "${extra[@]}"
    ;;
  esac
} 2>&1 | tee "$OUT/gpu_run${PART:-1}.log"
