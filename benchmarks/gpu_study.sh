#!/usr/bin/env bash
# Study runs on a lent CUDA machine whose image lacks MLflow (and maybe tenacity / mambapy): the study's own
# command, one job after another, MLflow off. Each finished run's record is copied to $OUT at once, so a run
# stopped by the machine's time limit still returns the runs finished before it; `report` imports the records into
# MLflow later, on a machine that has it (README, "On a CUDA machine"; BENCHMARKS.md §2i).
#
#   JOBS="beauty mamba4rec 3,ml-1m hymoerec 2" OUT=/tmp/out bash benchmarks/gpu_study.sh
#
# JOBS: comma-separated "<dataset> <variant> <seed>" (pipeline/study/spec.yaml); `python -m pipeline.study status
# --dataset ml-1m --jobs` prints the pending ones in plan order (add --variants to pick). The image may lack wheels and data:
# put the wheels in .whl/ (e.g. `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
# manylinux_2_17_x86_64 -d .whl tenacity mambapy==1.2.0`; they are installed into /tmp/site without an index) and
# the data mirror in shared/datasets/ (or set HYMOE_DATA_MIRROR). Both stay out of git (.git/info/exclude), so an
# ignored .whl/ must be carried to the machine explicitly (the device tool's `carry`); shared/ goes along by itself.
# PYTHON picks the interpreter (default python3).
#
# Output: the records in $OUT/records/<dataset>/<variant>-seed<k>.json, the logs in $OUT/<dataset>-<variant>-
# seed<k>.log. The records folder starts empty (in /tmp), so a run already in results/ is trained again, and its
# record has the same name as the committed one: copy into results/ only the runs that results/ lacks (a second
# device's rerun of a finished run belongs in benchmarks/gpu_runs/, as in BENCHMARKS.md §2i).
set -u

OUT="${OUT:-/tmp/gpu_study}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HYMOE_DATA_MIRROR="${HYMOE_DATA_MIRROR:-$PWD/shared/datasets}"
PARAMS=/tmp/gpu_study_params.yaml
"$PYTHON" -c "import sys, yaml
p = yaml.safe_load(open('params.yaml')); p['mlflow']['enabled'] = False
yaml.safe_dump(p, open(sys.argv[1], 'w'), sort_keys=False)" "$PARAMS" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

IFS=, read -ra jobs <<< "${JOBS:?JOBS=\"<dataset> <variant> <seed>,...\" is required}"
failed=0
for job in "${jobs[@]}"; do
    read -r dataset variant seed <<< "$job"
    log="$OUT/$dataset-$variant-seed$seed.log"
    echo "=== $(date +%T) start $dataset $variant seed $seed"
    "$PYTHON" -m pipeline.study --params "$PARAMS" --work-dir /tmp/gpu_study_work --records /tmp/gpu_study_records \
        run --dataset "$dataset" --variants "$variant" --seeds "$seed" > "$log" 2>&1
    rc=$?
    echo "=== $(date +%T) end $dataset $variant seed $seed rc=$rc"
    [ "$rc" -eq 0 ] || failed=1
    grep -a "test HR\|rror" "$log" | tail -3
    mkdir -p "$OUT/records/$dataset"
    cp /tmp/gpu_study_records/"$dataset/$variant-seed$seed".json "$OUT/records/$dataset/" 2> /dev/null
done
exit "$failed"
