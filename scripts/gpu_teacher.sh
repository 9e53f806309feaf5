#!/usr/bin/env bash
# Train demo-teacher candidates side by side on one lent GPU box (`pipeline.single`: no Ray or
# DeepSpeed there). Renders CLIPS world clips once, then trains the VARIANTS below in parallel
# processes for the time BUDGET leaves; weights + records land in $OUT/<variant>/, logs in
# $OUT/logs.txt. With WHEELS=1 it first installs the pydantic wheels carried in .whl/ (the box
# has torch, numpy, yaml, safetensors and fsspec, but no pydantic). Export and evaluate here:
#   python -m pipeline.single export --weights <OUT>/b/teacher --out /tmp/b
#   omniforcing eval --model /tmp/b --clips 64 --seconds 5 --seed 1000
# One run alone steps ~1.6× faster than each of four sharing the GPU (session 5): VARIANTS="e".
set -u
t0=$(date +%s)
OUT=${OUT:-/tmp/gpu-teacher} CLIPS=${CLIPS:-16384} BATCH=${BATCH:-128}
BUDGET=${BUDGET:-570}  # seconds for the whole script; training gets what rendering leaves
VARIANTS=${VARIANTS:-a b c d}
declare -A variants=(
  [a]=""  # the shipped architecture: patch 8 (one token per latent frame), 4 layers
  [b]="--set model.overrides.video.patch=4"
  [c]="--set model.overrides.layers=6"
  [d]="--set model.overrides.video.patch=4 --set model.overrides.layers=6"
  [e]="--set model.overrides.video.width=192"  # the session-5 CPU candidate
)
if [ "${WHEELS:-1}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python3 -m pipeline.single render --clips "$CLIPS" --seed 1 --out /tmp/lat || exit 1
MIN=${MIN:-$(python3 -c "print(max(0.5, ($BUDGET - ($(date +%s) - $t0) - 25) / 60))")}
echo "render done at $(($(date +%s) - t0)) s; training for $MIN min"
n=$(echo "$VARIANTS" | wc -w)
common=(--threads $(($(nproc) / n > 0 ? $(nproc) / n : 1)) --config configs/demo-teacher.yaml
  --latents /tmp/lat --minutes "$MIN" --set "data.batch_size=$BATCH" --set train.ema.decay=0.999)
for v in $VARIANTS; do
  # shellcheck disable=SC2086
  python3 -m pipeline.single train "${common[@]}" ${variants[$v]} --out "$OUT/$v" 2>&1 \
    | sed -u "s/^/$v: /" >> "$OUT/logs.txt" &
done
wait
grep -E "ms/step|saved step" "$OUT/logs.txt" | tail -n 12
for v in $VARIANTS; do grep "^$v: {" "$OUT/logs.txt" | tail -n 2; done
