#!/usr/bin/env bash
# The hour's CPU recipe for Carvana: an EfficientNet-Lite0 U-Net (ImageNet encoder) trained at 480x320,
# then finished at 960x640 from its best weights (train.py --init-from), two resumable runs:
#
#   bash scripts/cpu_recipe.sh [NAME] [TRAIN.PY OPTIONS...]   # e.g. bash scripts/cpu_recipe.sh hour --data-dir d
#
#   1. configs/cpu-hour.json          -> checkpoints/NAME-480/  (7 epochs on 256x256 crops of 480x320)
#   2. configs/cpu-hour-finish.json   -> checkpoints/NAME-960/  (2 epochs on 384x384 crops of 960x640,
#                                        starting from NAME-480/best.pt; its best.pt is the result)
#
# NAME defaults to cpu-recipe-<date>-<time>. Options after NAME go to both runs (--data-dir, --out-dir,
# --precision...). A stopped run continues with `python train.py --resume <its folder>`; then run step 2
# by hand as below. Times and scores: docs/exploration.md ("The hour's recipe").
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-cpu-recipe-$(date +%Y%m%d-%H%M%S)}
[[ $# -gt 0 ]] && shift
out=checkpoints
for ((i = 1; i <= $#; i++)); do  # where the runs go: train.py's --out-dir, if given
    case ${!i} in
        --out-dir) j=$((i + 1)); out=${!j} ;;
        --out-dir=*) out=${!i#--out-dir=} ;;
    esac
done
PY=${CARSEG_PYTHON:-python}
"$PY" train.py --config configs/cpu-hour.json --run-name "$name-480" "$@"
"$PY" train.py --config configs/cpu-hour-finish.json --init-from "$out/$name-480/best.pt" --run-name "$name-960" "$@"
echo "the recipe's model: $out/$name-960/best.pt"
