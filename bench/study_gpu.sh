#!/usr/bin/env bash
# The real-model study (issues #13, #15) on the lent GPU, in two warm device calls of at most 10 minutes each:
#   bash bench/study_gpu.sh train      5 single-task adapters + the mix + a 2nd seed of banking77 (EPOCHS each,
#                                      PARALLEL at once), then the merges linear, ties, dare_ties of the 5
#   bash bench/study_gpu.sh generate   at once: eval's generations for base/adapters/mix/merges on every task
#                                      (EVAL_WORKERS processes, nothing scored: the image lacks sqlglot and
#                                      rouge-score), the eval-vs-`ludwig predict` agreement on both adapter paths,
#                                      and the base with its chat template
# The adapters stay in /tmp/study on the device between the calls (20 MB each: too big to bring back); each call
# brings back what is small (study_generations.tar.gz: reports, generations, training stats, logs; timings.txt).
#
# Before (here, CPU):   ./run.sh study --base-model models/smollm2-135m --tasks sql,detox,banking77,samsum,instruct \
#                         --data-root ../shared/data --out runs/study-prep --prepared study_data --mix \
#                         --max-rows 1500 --test-rows 200 --stop-after prep
#                       tar czf study_data.tar.gz study_data    (~2 MB; .gpu-site is ~50 MB of the 64 MiB a call carries)
#                       grep -qxF '/study_data*' .git/info/exclude || echo '/study_data*' >> .git/info/exclude
# Device calls:         "bash bench/study_gpu.sh train", carry [".gpu-site", "study_data.tar.gz"], on a machine where
#                       an earlier call left the bf16 base in /tmp/smollm2 (../shared/gpu/README.md); then at once
#                       "bash bench/study_gpu.sh generate", carry [".gpu-site"]
# After (here, CPU):    mkdir -p runs/study-gpu && tar xzf <files_at>/study_generations.tar.gz -C runs/study-gpu
#                       ./run.sh eval --score-only runs/study-gpu/reports/study --prepared study_data --out runs/study-scored
#                       (and the same with reports/base-chat: the base with its chat template)
# Knobs (env): BASE=/tmp/smollm2 DATA=study_data.tar.gz TASKS=... EPOCHS=3 PARALLEL=7 EVAL_WORKERS=6 AGREE_ROWS=16
#              EVAL_BATCH=256 PROBE=general MERGE_LORA=off SEED_TASK=banking77 BUDGET_S=570 (each call stops its
#              optional steps to stay inside it); CPU=1 = a dry run on CPU (tiny model, few rows: the plumbing)
set -uo pipefail
PHASE=${1:-}
case "$PHASE" in train|generate) ;; *) echo "usage: bash bench/study_gpu.sh train|generate"; exit 2 ;; esac
T0=$(date +%s)
BASE=${BASE:-/tmp/smollm2}; DATA=${DATA:-study_data.tar.gz}; WORK=${WORK:-/tmp/study}
TASKS=${TASKS:-sql,detox,banking77,samsum,instruct}; PARALLEL=${PARALLEL:-7}; AGREE_ROWS=${AGREE_ROWS:-16}
EPOCHS=${EPOCHS:-3}; EVAL_WORKERS=${EVAL_WORKERS:-6}; MERGE_LORA=${MERGE_LORA:-off}
EVAL_BATCH=${EVAL_BATCH:-256}; PROBE=${PROBE:-general}; BUDGET_S=${BUDGET_S:-570}; SEED_TASK=${SEED_TASK:-banking77}
CPU=${CPU:-0}; DEVICE=cuda; DRY=(); [ "$CPU" = 1 ] && DEVICE=cpu && DRY=(--cpu --batch-size 8 --max-new-tokens 8)
OUT=${OUT:-$PWD/study_out}
mkdir -p "$OUT" "$WORK"
elapsed() { echo $(( $(date +%s) - T0 )); }
mark() { echo "[$PHASE $(elapsed) s] $*" | tee -a "$OUT/timings.txt"; }

[ -f "$BASE/config.json" ] || { echo "error: no base model at $BASE (convert it first, ../shared/gpu/README.md)"; exit 3; }
if [ "$PHASE" = train ] && [ -f "$DATA" ]; then  # the carried archive: unpacked where the study can write (the mix)
  rm -rf /tmp/study-data && mkdir -p /tmp/study-data && tar xzf "$DATA" -C /tmp/study-data
fi
[ -f "$DATA/sql/test.csv" ] || DATA=$(ls -d /tmp/study-data/*/ 2>/dev/null | head -1); DATA=${DATA%/}
[ -f "$DATA/sql/test.csv" ] || { echo "error: no prepared data at $DATA (prepare it here first and carry it)"; exit 3; }

# No venv on the image: Ludwig comes from .gpu-site; the project's fixes through a sitecustomize; a `ludwig` command.
SHIM=/tmp/study-shim; mkdir -p "$SHIM"
echo "import ludwig_mt.autoload" > "$SHIM/sitecustomize.py"
printf '#!%s\nfrom ludwig.cli import main\nmain()\n' "$(command -v python3)" > "$SHIM/ludwig"; chmod +x "$SHIM/ludwig"
export PYTHONPATH="$SHIM:$PWD:$PWD/.gpu-site" PATH="$SHIM:$PATH" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ds_meta=.gpu-site/deepspeed-0.19.8.dist-info  # as bench/gpu_evidence.sh: accelerate looks for deepspeed's metadata
if [ -d .gpu-site/deepspeed ] && [ ! -d "$ds_meta" ]; then
  mkdir -p "$ds_meta" && printf 'Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.8\n' > "$ds_meta/METADATA"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$OUT/timings.txt"

MERGE=()
if python3 -c "import workflow.merge" 2>/dev/null; then MERGE=(--merge linear,ties,dare_ties); else mark "no workflow.merge: merges skipped"; fi
STUDY=(python3 -m workflow.study --base-model "$BASE" --tasks "$TASKS" --prepared "$DATA" --out "$WORK" --mix
       --seeds 2 --seed-tasks "$SEED_TASK" --epochs "$EPOCHS" --parallel "$PARALLEL" "${MERGE[@]}" --probe "$PROBE"
       "${DRY[@]}")

pack() {  # everything but the adapters, small enough to come back; re-run after each step, a timeout keeps the last
  local files=() present=()
  pushd "$WORK" >/dev/null || return
  shopt -s nullglob
  files=(reports study.json agreement.json results/*/train.log results/*/training.json results/*/*.rendered.yaml
         results/*/*/training_statistics.json results/*/*/description.json results/*/*/model/training_progress.json
         results/*/*/model/model_hyperparameters.json merged/*/*.json agreement-work/*/predict.log agreement.log
         study-train.log study-generate.log base-chat.log)
  shopt -u nullglob
  for f in "${files[@]}"; do [ -e "$f" ] && present+=("$f"); done
  tar czf "$OUT/study_generations.tar.gz" "${present[@]}" && echo "packed $(stat -c %s "$OUT/study_generations.tar.gz") bytes"
  popd >/dev/null || return
}

throughput() {
  python3 - "$WORK/study.json" <<'PY' | tee -a "$OUT/timings.txt"
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{'model':<16}{'rows':>6}{'steps':>7}{'tok/s':>9}{'steps/s':>9}{'loop s':>8}{'wall s':>8}")
for t in d["trainings"]:
    f = lambda v, n=0: "-" if v is None else f"{v:.{n}f}"
    print(f"{t['name']:<16}{t['train_rows']:>6}{t['steps'] or '-':>7}{f(t['tokens_per_second']):>9}"
          f"{f(t['steps_per_second'], 2):>9}{f(t['loop_seconds'], 1):>8}{t['wall_seconds']:>8.1f}")
print("merges:", ", ".join(d.get("merges", {})) or "none", "| errors:", d.get("merge_errors") or "none")
PY
}

if [ "$PHASE" = train ]; then
  mark "train: ${TASKS} + mix + ${SEED_TASK} seed 2, ${EPOCHS} epochs, ${MERGE[*]:-} (${PARALLEL} at a time)"
  timeout $(( BUDGET_S - $(elapsed) )) "${STUDY[@]}" --stop-after train > "$WORK/study-train.log" 2>&1
  mark "train exit $? (log study-train.log)"; tail -15 "$WORK/study-train.log"
  throughput; pack; cp "$WORK/study.json" "$OUT/" 2>/dev/null
  mark "done"; exit 0
fi

# ---- generate: agreement and the templated base in the background, the study's generation in front
[ -f "$WORK/study.json" ] || { echo "error: no $WORK/study.json: run the train phase first on this warm machine"; exit 3; }
MODELS=$(python3 -c "import json; d=json.load(open('$WORK/study.json')); print(' '.join(f'--model {t[\"name\"]}={t[\"model_dir\"]}' for t in d['trainings'] if t['name'] in ('sql', 'banking77')))")
mark "agreement (${AGREE_ROWS} rows of sql, banking77; both paths) and the templated base, in the background"
# shellcheck disable=SC2086
timeout $(( BUDGET_S - 20 )) python3 -m workflow.agreement $MODELS --prepared "$DATA" --rows "$AGREE_ROWS" \
  --out "$WORK/agreement.json" --device "$DEVICE" --batch-size 64 > "$WORK/agreement.log" 2>&1 &
AGREE_PID=$!
timeout $(( BUDGET_S - 20 )) python3 -m eval --base-model "$BASE" --prepared "$DATA" --tasks "$TASKS" \
  --name base-chat --out "$WORK/reports" --generate-only --chat-template on --batch-size "$EVAL_BATCH" \
  --device "$DEVICE" --no-perplexity > "$WORK/base-chat.log" 2>&1 &
CHAT_PID=$!
mark "generate: --merge-lora $MERGE_LORA, ${EVAL_WORKERS} processes"
timeout $(( BUDGET_S - 30 - $(elapsed) )) "${STUDY[@]}" --generate-only --merge-lora "$MERGE_LORA" \
  --eval-workers "$EVAL_WORKERS" --eval-batch-size "$EVAL_BATCH" > "$WORK/study-generate.log" 2>&1
mark "generate exit $? (log study-generate.log)"; tail -12 "$WORK/study-generate.log"; pack
wait "$CHAT_PID" && mark "base with chat template generated" || mark "base with chat template: $(tail -1 "$WORK/base-chat.log")"
wait "$AGREE_PID" && mark "agreement: $(python3 -c "import json; c=json.load(open('$WORK/agreement.json'))['choice']; print(c)" 2>&1)" \
  || mark "agreement failed: $(tail -1 "$WORK/agreement.log")"
pack; cp "$WORK/agreement.json" "$OUT/" 2>/dev/null
mark "done"
ls -la "$OUT"
