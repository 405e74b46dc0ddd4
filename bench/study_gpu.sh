#!/usr/bin/env bash
# The real-model study (issue #13) on the lent GPU, in ONE device call of at most 10 minutes:
# train the 5 single-task adapters + the mix (+ a 2nd seed of banking77, + merges linear,ties,dare_ties when
# workflow/merge.py is in the checkout), 1 epoch each, several at once; measure eval-vs-`ludwig predict`
# agreement on both adapter paths; generate for base/adapters/mix/merges on every task (nothing scored: the image
# lacks sqlglot/rouge-score); bring back generations + identities + training stats + agreement (adapters stay).
#
# Before (here, CPU):   ./run.sh study --base-model x --tasks sql,detox,banking77,samsum,instruct \
#                         --data-root ../shared/data --out runs/study-prep --prepared study_data --mix \
#                         --max-rows 1500 --test-rows 200 --stop-after prep
#                       tar czf study_data.tar.gz study_data    (~2 MB; .gpu-site is ~44 MB of the 64 MiB a call carries)
#                       grep -qxF '/study_data*' .git/info/exclude || echo '/study_data*' >> .git/info/exclude
# Device call:          command "bash bench/study_gpu.sh", carry [".gpu-site", "study_data.tar.gz"], timeout_s 600,
#                       on a machine where an earlier call left the bf16 base in /tmp/smollm2 (../shared/gpu/README.md)
# After (here, CPU):    mkdir -p runs/study-gpu && tar xzf <files_at>/study_generations.tar.gz -C runs/study-gpu
#                       ./run.sh eval --score-only runs/study-gpu/reports/study --prepared study_data --out runs/study-scored
#                       (and, if it came back, the same with reports/base-chat: the base with its chat template)
# Knobs (env): BASE=/tmp/smollm2 DATA=study_data TASKS=... PARALLEL=7 AGREE_ROWS=16 EVAL_BATCH=256 PROBE=general
#              BUDGET_S=570 (the script skips optional steps and cuts generation to stay inside it)
#              SEED_TASK=banking77; CPU=1 = a dry run of this script on CPU (tiny model, few rows: tests the plumbing)
set -uo pipefail
T0=$(date +%s)
BASE=${BASE:-/tmp/smollm2}; DATA=${DATA:-study_data.tar.gz}; WORK=${WORK:-/tmp/study}
TASKS=${TASKS:-sql,detox,banking77,samsum,instruct}; PARALLEL=${PARALLEL:-7}; AGREE_ROWS=${AGREE_ROWS:-16}
EVAL_BATCH=${EVAL_BATCH:-256}; PROBE=${PROBE:-general}; BUDGET_S=${BUDGET_S:-570}; SEED_TASK=${SEED_TASK:-banking77}
CPU=${CPU:-0}; DEVICE=cuda; DRY=(); [ "$CPU" = 1 ] && DEVICE=cpu && DRY=(--cpu --batch-size 8 --max-new-tokens 8)
OUT=${OUT:-$PWD/study_out}
mkdir -p "$OUT" "$WORK"
elapsed() { echo $(( $(date +%s) - T0 )); }
mark() { echo "[$(elapsed) s] $*" | tee -a "$OUT/timings.txt"; }

[ -f "$BASE/config.json" ] || { echo "error: no base model at $BASE (convert it first, ../shared/gpu/README.md)"; exit 3; }
if [ -f "$DATA" ]; then  # the carried archive of the prepared folder: unpacked where the study can write (the mix)
  rm -rf /tmp/study-data && mkdir -p /tmp/study-data && tar xzf "$DATA" -C /tmp/study-data && DATA=$(ls -d /tmp/study-data/*/)
  DATA=${DATA%/}
fi
[ -f "$DATA/sql/test.csv" ] || { echo "error: no prepared data at $DATA (prepare it here first and carry it)"; exit 3; }

# No venv on the image: Ludwig comes from .gpu-site; the project's fixes through a sitecustomize; a `ludwig` command.
SHIM=/tmp/study-shim; mkdir -p "$SHIM"
echo "import ludwig_mt.autoload" > "$SHIM/sitecustomize.py"
printf '#!%s\nfrom ludwig.cli import main\nmain()\n' "$(command -v python3)" > "$SHIM/ludwig"; chmod +x "$SHIM/ludwig"
export PYTHONPATH="$SHIM:$PWD:$PWD/.gpu-site" PATH="$SHIM:$PATH" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
ds_meta=.gpu-site/deepspeed-0.19.8.dist-info  # as bench/gpu_evidence.sh: accelerate looks for deepspeed's metadata
if [ -d .gpu-site/deepspeed ] && [ ! -d "$ds_meta" ]; then
  mkdir -p "$ds_meta" && printf 'Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.8\n' > "$ds_meta/METADATA"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$OUT/timings.txt"

MERGE=()
if python3 -c "import workflow.merge" 2>/dev/null; then MERGE=(--merge linear,ties,dare_ties); else mark "no workflow.merge: merges skipped"; fi
STUDY=(python3 -m workflow.study --base-model "$BASE" --tasks "$TASKS" --prepared "$DATA" --out "$WORK" --mix
       --seeds 2 --seed-tasks "$SEED_TASK" --epochs 1 --parallel "$PARALLEL" "${MERGE[@]}" --probe "$PROBE" "${DRY[@]}")

pack() {  # everything but the adapters, small enough to come back; re-run after each phase, a timeout keeps the last
  local files=()
  pushd "$WORK" >/dev/null || return
  shopt -s nullglob
  files=(reports study.json agreement.json results/*/train.log results/*/training.json results/*/*.rendered.yaml
         results/*/*/training_statistics.json results/*/*/description.json results/*/*/model/training_progress.json
         results/*/*/model/model_hyperparameters.json merged/*/*.json agreement-work/*/predict.log study-train.log
         base-chat.log)
  shopt -u nullglob
  local present=()
  for f in "${files[@]}"; do [ -e "$f" ] && present+=("$f"); done
  tar czf "$OUT/study_generations.tar.gz" "${present[@]}" && echo "packed $(stat -c %s "$OUT/study_generations.tar.gz") bytes"
  popd >/dev/null || return
}

mark "train: ${TASKS} + mix + ${SEED_TASK} seed 2 ${MERGE[*]:-} (${PARALLEL} at a time)"
"${STUDY[@]}" --stop-after train 2>&1 | tee "$WORK/study-train.log" | grep -v "^\s*$" | tail -40
mark "trained"; pack

CHOICE=auto; AGREE=()
if [ "$(elapsed)" -lt 300 ]; then
  MODELS=$(python3 -c "import json; d=json.load(open('$WORK/study.json')); print(' '.join(f'--model {t[\"name\"]}={t[\"model_dir\"]}' for t in d['trainings'] if t['name'] in ('sql', 'banking77')))")
  # shellcheck disable=SC2086
  if timeout $(( BUDGET_S - 240 - $(elapsed) )) python3 -m workflow.agreement $MODELS --prepared "$DATA" --rows "$AGREE_ROWS" \
       --out "$WORK/agreement.json" --device "$DEVICE" --batch-size 64 2>&1 | tail -5; then
    CHOICE=$(python3 -c "import json; print(json.load(open('$WORK/agreement.json'))['choice']['merge_lora'])" 2>/dev/null || echo auto)
    [ -f "$WORK/agreement.json" ] && AGREE=(--agreement "$WORK/agreement.json")
  fi
  mark "agreement done: score with --merge-lora $CHOICE"
else
  mark "agreement skipped (time): eval's default path (merged on CUDA)"
fi

mark "generate (no scoring), --merge-lora $CHOICE"
timeout $(( BUDGET_S - 30 - $(elapsed) )) "${STUDY[@]}" --generate-only --merge-lora "$CHOICE" "${AGREE[@]}" \
  --eval-batch-size "$EVAL_BATCH" 2>&1 | grep -v "^\s*$" | tail -25
mark "generated"; pack

if [ "$(elapsed)" -lt $(( BUDGET_S - 90 )) ]; then  # the instruct base as it is meant to be prompted
  timeout $(( BUDGET_S - 20 - $(elapsed) )) python3 -m eval --base-model "$BASE" --prepared "$DATA" --tasks "$TASKS" \
    --name base-chat --out "$WORK/reports" --generate-only --chat-template on --batch-size "$EVAL_BATCH" \
    --device "$DEVICE" --no-perplexity > "$WORK/base-chat.log" 2>&1 \
    && mark "base with chat template generated" || mark "base with chat template failed: $(tail -1 "$WORK/base-chat.log")"
  pack
else
  mark "base with chat template skipped (time)"
fi
cp "$WORK/study.json" "$OUT/" 2>/dev/null; cp "$WORK/agreement.json" "$OUT/" 2>/dev/null
python3 - "$WORK/study.json" <<'EOF' | tee -a "$OUT/timings.txt"
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{'model':<16}{'rows':>6}{'steps':>7}{'tok/s':>9}{'steps/s':>9}{'loop s':>8}{'wall s':>8}")
for t in d["trainings"]:
    f = lambda v, n=0: "-" if v is None else f"{v:.{n}f}"
    print(f"{t['name']:<16}{t['train_rows']:>6}{t['steps'] or '-':>7}{f(t['tokens_per_second']):>9}"
          f"{f(t['steps_per_second'], 2):>9}{f(t['loop_seconds'], 1):>8}{t['wall_seconds']:>8.1f}")
EOF
mark "done"
ls -la "$OUT"
