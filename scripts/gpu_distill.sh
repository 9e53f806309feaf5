#!/usr/bin/env bash
# Long Self-Forcing DMD on one lent GPU box (`pipeline.single distill`: no Ray or DeepSpeed
# there), issue 23's open question: does a far longer distribution-matching run lift the ODE
# student's sync? Renders CLIPS world clips, then distils from the ODE student bundle at STUDENT
# (carry it: copy it into an ignored folder of the repo, e.g. .carry/ode, name that in `carry`)
# for what BUDGET leaves; SNAPSHOTS evenly spaced student weights land in $OUT/sf/ (22 MB each for
# the demo: 2 fit the 64 MiB a lease returns). Unless WHEELS=0 it first installs the pydantic
# wheels carried in .whl/ (see scripts/gpu_teacher.sh). Back here:
#   python -m pipeline.single export-student --weights <OUT>/sf/student-step-N --out /tmp/s
#   omniforcing eval --model /tmp/s --clips 64 --seconds 5
# Extra `--set` overrides go in SETS (e.g. SETS="--set distill.loss_scope=last_block").
set -u -o pipefail
t0=$(date +%s)
OUT=${OUT:-/tmp/gpu-distill} CLIPS=${CLIPS:-256} BATCH=${BATCH:-2} SNAPSHOTS=${SNAPSHOTS:-2}
BUDGET=${BUDGET:-540}  # seconds for the whole script; distillation gets what rendering leaves
STUDENT=${STUDENT:?the ODE student bundle to start from}
if [ "${WHEELS:-1}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python3 -m pipeline.single render --clips "$CLIPS" --seed 1 --out /tmp/lat || exit 1
MIN=$(python3 -c "print(max(0.5, ($BUDGET - ($(date +%s) - $t0) - 40) / 60))")
echo "render done at $(($(date +%s) - t0)) s; distilling for $MIN min"
# shellcheck disable=SC2086
python3 -m pipeline.single distill --config configs/demo.yaml --latents /tmp/lat \
  --minutes "$MIN" --out "$OUT/sf" --snapshots "$SNAPSHOTS" --set "data.batch_size=$BATCH" \
  --set "distill.student.init_from=$STUDENT" --set train.lr=1e-4 --set train.steps=1000000 \
  --set train.warmup_steps=12 --set distill.loss_scope=every_block ${SETS:-} 2>&1 \
  | tee "$OUT/log.txt" | grep --line-buffered -E "s/step|saved|rror|Traceback|\"step\": [0-9]*00,"
