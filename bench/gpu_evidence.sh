#!/usr/bin/env bash
# The GPU evidence of issues #4-#7 in one device call (the lent H100; device time is scarce):
#   eval throughput (bench/eval_speed.py), ZeRO-2 through the launcher vs single-process Ludwig on sql.yaml
#   (bench/zero2_single_gpu.py), the scaling script's points for the GPUs the machine has (bench/scaling.py), and
#   the training-speed benchmark (bench/train_speed.py; its arguments in SPEED_ARGS, e.g. --shapes/--only).
# Run from the project root on the device, with packages from .gpu-site (../shared/gpu/README.md):
#   OUT=$OUT bash bench/gpu_evidence.sh [eval] [zero2] [scaling] [speed]     (no argument: the first three)
# Each part has its own time limit; a part that fails leaves its log in $OUT and the next one still runs.
set -u
export PYTHONPATH="$PWD/.gpu-site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:?set OUT to the results folder}
mkdir -p "$OUT"
parts=${*:-eval zero2 scaling}
# make-gpu-site.sh copies deepspeed's package folder from its source archive, without metadata; accelerate looks
# for the metadata (importlib.metadata) and would report "DeepSpeed is not installed".
ds_meta=.gpu-site/deepspeed-0.19.8.dist-info
if [ -d .gpu-site/deepspeed ] && [ ! -d "$ds_meta" ]; then
  mkdir -p "$ds_meta" && printf 'Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.8\n' > "$ds_meta/METADATA"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1

run_part() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
  local code=$?
  echo "$name: exit $code in $((SECONDS - start)) s" | tee -a "$OUT/parts.txt"
  if [ "$code" != 0 ]; then  # the scripts keep their per-run logs in /tmp: bring back each traceback
    grep -h -A40 "Traceback" /tmp/"${name%_speed}"*/*.log 2>/dev/null | grep -v "Loading weights\|Writing model" \
      | tail -n 200 >> "$OUT/$name.log"
  fi
  tail -n 14 "$OUT/$name.txt"
}

for part in $parts; do
  case $part in
    eval) run_part eval_speed 240 python3 bench/eval_speed.py --out "$OUT" --no-raw-ludwig ;;
    zero2) run_part zero2 270 python3 bench/zero2_single_gpu.py --out "$OUT" --steps 24 --timeout 130 ;;
    scaling) run_part scaling 280 python3 bench/scaling.py --out "$OUT" --shapes llama3.1-8b --steps 6 ;;
    # shellcheck disable=SC2086  # SPEED_ARGS is a list of arguments
    speed) run_part train_speed "${SPEED_LIMIT:-560}" python3 bench/train_speed.py --out "$OUT" ${SPEED_ARGS:-} ;;
    *) echo "unknown part: $part (use eval, zero2, scaling, speed)" >&2; exit 2 ;;
  esac
done
