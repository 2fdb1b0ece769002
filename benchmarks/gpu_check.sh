#!/usr/bin/env bash
# GPU readiness: the tuning flow on CUDA with two trials sharing one GPU (--gpu-per-worker 0.5)
# and bf16 autocast where the GPU has it (--precision auto), on the bundled sample data.
# Prints training tokens/s, the GPU's memory peak and test F1; fails past 5 minutes. Then whole GPUs
# per worker: --num-workers 1 --gpu-per-worker 1, and with 2+ GPUs --num-workers 2 (DDP over nccl).
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/venv/bin/python to pick the interpreter
#
# Installs nothing: it needs the project installed (pip install -c constraints.txt -e .) with a
# CUDA build of torch, and nvidia-smi. Everything it writes goes to a temporary folder it names.
set -euo pipefail

PYTHON=${PYTHON:-python}
LIMIT_S=${GPU_CHECK_LIMIT_S:-300}
cd "$(dirname "$0")/.."

command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: no NVIDIA driver here" >&2; exit 2; }
"$PYTHON" - <<'EOF' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (a CPU-only build, or no driver)")
name = torch.cuda.get_device_name(0)
print(f"gpu_check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
EOF

WORK=$(mktemp -d -t tagifai-gpu-check-XXXXXX)
echo "gpu_check: working in $WORK"
mkdir -p "$WORK/mlruns"
export PREFECT_HOME="$WORK/prefect-home" XDG_CACHE_HOME="$WORK/cache" HF_HUB_OFFLINE=1
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} PREFECT_SERVER_ANALYTICS_ENABLED=false
unset RAY_ADDRESS MLFLOW_TRACKING_URI PREFECT_API_URL

# The GPU's used memory every 200 ms, in the background, for the peak.
BASELINE_MB=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 >"$WORK/gpu_memory_mb.txt" &
SAMPLER=$!
trap 'kill "$SAMPLER" 2>/dev/null || true' EXIT

STARTED=$(date +%s.%N)
status=0
timeout "$LIMIT_S" "$PYTHON" -m flows.tune \
    --gpu-per-worker 0.5 --precision auto --cpu-per-worker 1 --max-concurrent 2 \
    --experiment-name gpu-check --tracking-uri "sqlite:///$WORK/mlruns/mlflow.db" \
    --storage-path "$WORK/ray_results" --results-fp "$WORK/summary.json" >"$WORK/flow.log" 2>&1 || status=$?
ENDED=$(date +%s.%N)
kill "$SAMPLER" 2>/dev/null || true
if [ "$status" -ne 0 ]; then
    tail -40 "$WORK/flow.log" >&2
    [ "$status" -eq 124 ] && echo "gpu_check: FAILED: the flow took more than ${LIMIT_S} s" >&2
    echo "gpu_check: FAILED (exit $status); full log: $WORK/flow.log" >&2
    exit 1
fi

"$PYTHON" - "$WORK" "$STARTED" "$ENDED" "$BASELINE_MB" "$LIMIT_S" <<'EOF'
import json, sys
from pathlib import Path

from benchmarks.cli_run import mlflow_trials
from tagifai.batching import tokenize_splits
from tagifai.data import load_dataset, split_dataset
from tagifai.settings import TuneSettings

work, started, ended, baseline, limit = Path(sys.argv[1]), *map(float, sys.argv[2:6])
summary = json.loads((work / "summary.json").read_text())
memory = [float(line) for line in (work / "gpu_memory_mb.txt").read_text().split() if line.strip()]
# Real (unpadded) tokens of one epoch: the flow's own train split (the defaults), tokenized again here.
defaults = TuneSettings()
splits = split_dataset(load_dataset(defaults.dataset_loc).frame, seed=defaults.seed)
epoch_tokens = int(tokenize_splits(splits, defaults.model, defaults.max_length).train.lengths.sum())
tokens = seconds = 0.0
for record in sorted(work.glob("ray_results/**/trial_records/*/record.json")):
    epochs = json.loads(record.read_text())["epochs"]
    trial_tokens = epoch_tokens * len(epochs)
    trial_s = sum(e["epoch_time_s"] for e in epochs)  # training + validation of every epoch
    tokens, seconds = tokens + trial_tokens, seconds + trial_s
    print(f"trial {record.parent.name}: {len(epochs)} epochs, {trial_tokens / trial_s:,.0f} tokens/s")
# The study's span: first epoch start to last epoch end (epoch ends are MLflow metric timestamps).
trials = mlflow_trials(f"sqlite:///{work}/mlruns/mlflow.db", "gpu-check")
spans = [(e["end"] - e["epoch_time_s"], e["end"]) for t in trials for e in t["epochs"]]
study_s = max(end for _, end in spans) - min(start for start, _ in spans)
print(f"wall (process start to exit): {ended - started:.1f} s (limit {limit:.0f} s); study {study_s:.1f} s")
print(
    f"training tokens/s: {tokens / seconds:,.0f} per trial (epochs incl. validation), "
    f"{tokens / study_s:,.0f} for the GPU (trials side by side)"
)
if memory:
    peak = max(memory)
    print(f"GPU memory peak: {peak:,.0f} MiB used ({peak - baseline:,.0f} MiB above the {baseline:,.0f} before the run)")
print(f"test F1: {summary['test']['f1']:.3f} on {summary['test']['num_samples']} rows; best params {summary['params']}")
EOF

# Whole GPUs per worker (issue 22): --num-workers 1 --gpu-per-worker 1, a trial on one GPU; with two
# or more GPUs also --num-workers 2, a Ray Train run of 2 workers (DDP over nccl, one GPU each).
GPUS=$(nvidia-smi --list-gpus | wc -l)
for WORKERS in 1 $([ "$GPUS" -ge 2 ] && echo 2); do
    NAME="gpu-check-workers-$WORKERS"
    status=0
    timeout "$LIMIT_S" "$PYTHON" -m flows.tune \
        --num-workers "$WORKERS" --gpu-per-worker 1 --cpu-per-worker 1 --max-concurrent 1 --num-runs 2 \
        --experiment-name "$NAME" --tracking-uri "sqlite:///$WORK/mlruns/mlflow.db" \
        --storage-path "$WORK/ray_results" --results-fp "$WORK/$NAME.json" >"$WORK/$NAME.log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        tail -40 "$WORK/$NAME.log" >&2
        echo "gpu_check: FAILED: --num-workers $WORKERS --gpu-per-worker 1 (exit $status); log: $WORK/$NAME.log" >&2
        exit 1
    fi
    "$PYTHON" - "$WORK" "$NAME" <<'PY'
import json, sys
from pathlib import Path

from mlflow.tracking import MlflowClient

work, name = Path(sys.argv[1]), sys.argv[2]
summary = json.loads((work / f"{name}.json").read_text())
client = MlflowClient(f"sqlite:///{work}/mlruns/mlflow.db")
runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
for run in runs:
    epochs = [round(m.value, 2) for m in sorted(client.get_metric_history(run.info.run_id, "epoch_time_s"), key=lambda m: m.step)]
    print(f"{name}: run {run.info.status}, num_workers {run.data.params.get('num_workers')}, "
          f"world_size {run.data.params.get('world_size')}, epoch_time_s {epochs}")
print(f"{name}: test F1 {summary['test']['f1']:.3f}")
PY
done
