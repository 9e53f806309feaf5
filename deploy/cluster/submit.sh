#!/usr/bin/env bash
# Submit one OmniForcing stage to a running Ray cluster with `ray job submit` (KubeRay head
# service, `ray up`, or any cluster whose dashboard you can reach), or package the code for
# deploy/cluster/rayjob.yaml / rayservice.yaml.
#
#   export RAY_ADDRESS=http://ray-head.example:8265      # the cluster's dashboard / job API
#   export MLFLOW_TRACKING_URI=https://mlflow.example.internal
#   deploy/cluster/submit.sh [STAGE] [-- extra omniforcing args]   # STAGE: teacher|ode|self-forcing
#   deploy/cluster/submit.sh --dry-run self-forcing                 # print the command only
#   deploy/cluster/submit.sh --package-only                         # zip -> $CODE_BUCKET, print URI
#
# Settings (environment): CONFIG (default configs/ltx2.yaml), CODE_BUCKET (default
# s3://omniforcing-artifacts/code), SUBMISSION_ID (default omniforcing-STAGE-<time>).
# S3 credentials come from the cluster nodes (instance role or the omniforcing-aws secret), never
# from this script. The job first runs `omniforcing check`, so a missing bucket, an unreachable
# MLflow server or too few GPUs fail the job in seconds, before any worker starts.
set -euo pipefail

cd "$(dirname "$0")/../.."   # repository root: the job's working_dir
CONFIG="${CONFIG:-configs/ltx2.yaml}"
CODE_BUCKET="${CODE_BUCKET:-s3://omniforcing-artifacts/code}"
DRY_RUN=0
PACKAGE_ONLY=0
STAGE="self-forcing"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --package-only) PACKAGE_ONLY=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    teacher|ode|self-forcing) STAGE="$1" ;;
    *) echo "submit.sh: unknown argument '$1' (stage: teacher|ode|self-forcing)" >&2; exit 2 ;;
  esac
  shift
done

if [[ "$PACKAGE_ONLY" == 1 ]]; then
  # Committed code only (git archive): what runs is exactly a commit, named by its hash.
  commit="$(git rev-parse --short=12 HEAD)"
  zip="/tmp/omniforcing-${commit}.zip"
  git archive --format=zip -o "$zip" HEAD
  uri="${CODE_BUCKET%/}/omniforcing-${commit}.zip"
  if [[ "$DRY_RUN" == 1 ]]; then echo "would upload $zip to $uri"; else aws s3 cp "$zip" "$uri"; fi
  echo "$uri"   # put this in working_dir of rayjob.yaml / rayservice.yaml
  exit 0
fi

[[ -f "$CONFIG" ]] || { echo "submit.sh: config $CONFIG not found" >&2; exit 2; }
if [[ -z "${MLFLOW_TRACKING_URI:-}" ]]; then
  echo "submit.sh: set MLFLOW_TRACKING_URI to the team's MLflow server" >&2; exit 2
fi
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
SUBMISSION_ID="${SUBMISSION_ID:-omniforcing-${STAGE}-$(date +%Y%m%d-%H%M%S)}"

# The runtime env: the working dir is uploaded by `ray job submit`; pip installs the package
# from it into the job's virtualenv (which still sees the image's torch and ray).
RUNTIME_ENV=$(cat <<JSON
{
  "pip": {"packages": ["\${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"], "pip_check": false},
  "excludes": [".git", "runs", "mlruns", "eval-out", "data/shards", "**/__pycache__", "*.tar"],
  "env_vars": {
    "MLFLOW_TRACKING_URI": "${MLFLOW_TRACKING_URI}",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
    "DS_ACCELERATOR": "cuda"
  }
}
JSON
)

ENTRY="omniforcing check --config ${CONFIG} --ray-address auto && omniforcing train ${STAGE} --config ${CONFIG}"
if [[ ${#EXTRA[@]} -gt 0 ]]; then ENTRY="${ENTRY} $(printf '%q ' "${EXTRA[@]}")"; fi

CMD=(ray job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID" --working-dir .
     --runtime-env-json "$RUNTIME_ENV" -- bash -c "$ENTRY")
if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
"${CMD[@]}"
echo "follow: ray job logs --address $ADDRESS --follow $SUBMISSION_ID"
echo "resume after a failure: $0 $STAGE -- --resume latest"
