#!/usr/bin/env bash
# The owed GPU measurements as one device call that fits a 10-minute command limit: each step has
# its own time limit, so one that hangs or runs out of memory costs only its share, and every
# step's output lands in $OUT/gpu_run$PART.log as it runs. Run benchmarks/gpu_wheels.sh here first,
# then, through the device tool with carry [".whl"]:
#   bash benchmarks/gpu_run.sh
# PART=2 and PART=3 run the rest. Each part takes at most 9 minutes: a session's lease is 15
# minutes with the machine's start, so one part a session, in order. A CPU rehearsal at
# toy sizes: SMOKE=1 [PART=2|3] bash benchmarks/gpu_run.sh
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
  big=default; mid=tiny; attn=xla; steps=3; extra=(--data.seq_len 64 --batch_size 8)
else
  big=1b; mid=small; attn=cudnn; steps=10; extra=()
fi

step() {  # step SECONDS NAME COMMAND...: run with a limit, log it, go on whatever happens
  local limit=$1 name=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@"
  echo "=== $name: rc $? after $((SECONDS - start))s"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  $PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'orbax', o.__version__, jax.devices())"
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 || true
  if [[ ${PART:-1} == 1 ]]; then
    # Why `small`'s step trails torch.compile's (0.79x, rounds 13 % apart): where its time goes,
    # then which knob moves it (as configured, loss in 8 chunks, double batch, cuBLAS only,
    # layers unrolled); then where the 1B step's time goes.
    step 100 profile_small $PY benchmarks/mfu.py --config $mid --mesh.data=1 --steps $steps \
      --profile /tmp/profile_small "${extra[@]}"
    step 240 sweep_small $PY benchmarks/mfu_sweep.py --config $mid --mesh.data=1 --only 0,3,4,6,8 \
      --steps $steps --variant_timeout 60 --attention $attn --out "$OUT/small" "${extra[@]}"
    step 120 profile $PY benchmarks/mfu.py --config $big --mesh.data=1 --steps $steps \
      --profile /tmp/profile "${extra[@]}"
  elif [[ ${PART} == 2 ]]; then
    # Against transformers + PyTorch at 1B, all three variants (HF gradient checkpointing on
    # the torch side, as our dots_no_batch remat; without it torch's eager step ran out of memory).
    step 280 vs_pytorch_1b $PY benchmarks/vs_pytorch.py --config $big --rounds 2 \
      --steps_per_round 3 --warmup 2 --cycles 1 "${extra[@]}"
    # Checkpoint writes from a GPU host (its default 3 GB state: `1b`'s 20 GB, saved twice a
    # round beside a raw copy, would fill the machine's 64 GB disk).
    step 200 checkpoint_io $PY benchmarks/checkpoint_io.py --rounds 2 "${extra[@]}"
  else
    # The 1B sweep's last variants: full remat at double batch, cuBLAS only, XLA attention,
    # layers unrolled (compile time unknown).
    step 420 mfu_sweep $PY benchmarks/mfu_sweep.py --config $big --mesh.data=1 --only 5,6,7,8 \
      --steps $steps --variant_timeout 120 --attention $attn --out "$OUT" "${extra[@]}"
  fi
} 2>&1 | tee "$OUT/gpu_run${PART:-1}.log"
