#!/usr/bin/env bash
# GPU smoke test of the weight-sharding strategies through the launcher, world size 1 (one GPU), on the tiny
# random-weight Llama with a YAML WITHOUT quantization (the sql.yaml --cpu rendering): per strategy
#   python -m ludwig_mt.launch --gpus 1 --strategy S -- train ...   then   ludwig predict on the saved model,
# and a check that the saved adapter holds whole, non-empty tensors equal to the last checkpoint's.
# The CPU tests (tests/ludwig_mt/patches/test_distributed.py) cover 2 ranks on gloo; this covers CUDA + NCCL + FSDP2 +
# deepspeed.zero.Init on a GPU. Run from the project root on the device, with packages from .gpu-site:
#   OUT=$OUT bash bench/fsdp_zero3_gpu_smoke.sh                 # STRATEGIES="zero3 fsdp" by default
#   STRATEGIES=fsdp OUT=$OUT bash bench/fsdp_zero3_gpu_smoke.sh   # one of them
# Logs and a summary (smoke.txt) go to $OUT; exits non-zero when any strategy fails.
set -u
export PYTHONPATH="$PWD/.gpu-site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:?set OUT to the results folder}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/fsdp_zero3_smoke.XXXXXX)
ds_meta=.gpu-site/deepspeed-0.19.8.dist-info  # accelerate reads deepspeed's metadata (see bench/gpu_evidence.sh)
if [ -d .gpu-site/deepspeed ] && [ ! -d "$ds_meta" ]; then
  mkdir -p "$ds_meta" && printf 'Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.8\n' > "$ds_meta/METADATA"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1

"$PY" - "$WORK" > "$OUT/setup.log" 2>&1 <<'EOF' || { echo "setup failed (see $OUT/setup.log)"; exit 1; }
import sys
from pathlib import Path

import pandas as pd

from ludwig_mt.config import load_yaml, render_overrides, write_yaml
from ludwig_mt.tiny_model import build_tiny_llama
from prep.registry import get_task
from prep.task import prepare
from workflow.samples import write_sql_sample

root = Path(sys.argv[1])
tiny = build_tiny_llama(root / "tiny")
report = prepare(get_task("sql"), str(write_sql_sample(root / "v4.json", 120)), root / "prepared")
rows = pd.read_csv(report.files["train"], keep_default_na=False)
pd.concat([rows[rows.split == 0].head(64), rows[rows.split == 1].head(8)]).to_csv(root / "train.csv", index=False)
(root / "test.csv").write_bytes(Path(report.files["test"]).read_bytes())
config = render_overrides(load_yaml(get_task("sql").config_path()), base_model=str(tiny), cpu=True, epochs=2,
                          batch_size=4, max_sequence_length=48, max_new_tokens=4)  # cpu=True: no quantization
config["trainer"].update(learning_rate=0.01, steps_per_checkpoint=5)
write_yaml(config, root / "sql.yaml")
EOF

status=0
for strategy in ${STRATEGIES:-zero3 fsdp}; do
  run="$WORK/$strategy"
  start=$SECONDS
  timeout 300 "$PY" -m ludwig_mt.launch --gpus 1 --strategy "$strategy" -- train --config "$WORK/sql.yaml" \
    --dataset "$WORK/train.csv" --output_directory "$run" > "$OUT/$strategy-train.log" 2>&1 \
  && timeout 200 "$PY" -m ludwig_mt.launch worker predict --model_path "$run/experiment_run/model" \
    --dataset "$WORK/test.csv" --output_directory "$run/predict" > "$OUT/$strategy-predict.log" 2>&1 \
  && "$PY" - "$run/experiment_run/model" "$run/predict" > "$OUT/$strategy-check.txt" 2>&1 <<'EOF'
import sys
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

model, predict = Path(sys.argv[1]), Path(sys.argv[2])
adapter = load_file(str(model / "model_weights/adapter_model.safetensors"))
best = load_file(str(model / "training_checkpoints/best.ckpt.safetensors"))
assert adapter and all(v.numel() > 0 for v in adapter.values()), "empty tensors in the saved adapter"
named = {"model." + k.replace(".weight", ".default.weight"): v for k, v in adapter.items()}
assert named.keys() == best.keys() and all((named[k].cpu() == best[k].cpu()).all() for k in best), "adapter != best"
assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "LoRA B still zero: nothing trained"
rows = len(pd.read_parquet(next(predict.rglob("*.parquet"))))
print(f"ok: {len(adapter)} adapter tensors, {sum(v.numel() for v in adapter.values())} weights, {rows} predictions")
EOF
  code=$?
  echo "$strategy: exit $code in $((SECONDS - start)) s: $(tail -n 1 "$OUT/$strategy-check.txt" 2>/dev/null)" \
    | tee -a "$OUT/smoke.txt"
  if [ "$code" != 0 ]; then
    status=1
    grep -h -A30 "Traceback\|^error:" "$OUT/$strategy-train.log" "$OUT/$strategy-predict.log" 2>/dev/null \
      | tail -n 80 >> "$OUT/smoke.txt"
  fi
done
exit $status
