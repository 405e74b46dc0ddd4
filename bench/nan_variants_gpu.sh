#!/usr/bin/env bash
# Why does QLoRA training diverge to NaN on SmolLM2-135M (samsum, H200)? Trains samsum for 1 epoch under 6 variants at
# once (as is; eager attention; padding fix, Liger, response-only logits, bf16 autocast each off) and runs an SDPA
# fully-masked-row micro-test. Measured 2026-12-02: only eager attention trained (docs/study/README.md).
# Device call: "bash bench/nan_variants_gpu.sh", carry [".gpu-site", "study_data.tar.gz"], base in /tmp/smollm2.
set -uo pipefail
OUT=${OUT:-$PWD/diag_out}; mkdir -p "$OUT"
rm -rf /tmp/study-data && mkdir -p /tmp/study-data && tar xzf study_data.tar.gz -C /tmp/study-data
SHIM=/tmp/study-shim; mkdir -p "$SHIM"
echo "import ludwig_mt.autoload" > "$SHIM/sitecustomize.py"
printf '#!%s\nfrom ludwig.cli import main\nmain()\n' "$(command -v python3)" > "$SHIM/ludwig"; chmod +x "$SHIM/ludwig"
export PYTHONPATH="$SHIM:$PWD:$PWD/.gpu-site" PATH="$SHIM:$PATH" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
ds_meta=.gpu-site/deepspeed-0.19.8.dist-info
[ -d .gpu-site/deepspeed ] && [ ! -d "$ds_meta" ] && mkdir -p "$ds_meta" && printf 'Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.8\n' > "$ds_meta/METADATA"
python3 - > "$OUT/sdpa.txt" 2>&1 <<'PY' &
import torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
for L, pad in ((496, 450), (720, 650), (720, 100), (256, 200)):
    for be in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH, None):
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 9, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        keep = torch.ones(2, L, dtype=torch.bool, device="cuda"); keep[1, :pad] = False
        mask = torch.tril(torch.ones(L, L, dtype=torch.bool, device="cuda"))[None, None] & keep[:, None, None, :]
        try:
            if be is None:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                with sdpa_kernel([be]):
                    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            (o[:, :, -20:].float().sum()).backward()
            print(L, pad, be, "out nan", bool(o.isnan().any()), "grad nan", any(bool(t.grad.isnan().any()) for t in (q, k, v)))
        except Exception as e:
            print(L, pad, be, "error", type(e).__name__, str(e)[:100])
PY
run() {  # name env...
  local name=$1; shift
  env "$@" timeout 300 python3 -m workflow.study --base-model /tmp/smollm2 --tasks samsum --prepared /tmp/study-data/study_data \
    --out /tmp/diag/$name --epochs 1 --stop-after train > "/tmp/diag-$name.log" 2>&1
  local nan=$(tr '\r' '\n' < /tmp/diag/$name/results/samsum/train.log 2>/dev/null | grep -c "loss=nan")
  echo "$name exit $? nan-lines $nan last $(tr '\r' '\n' < /tmp/diag/$name/results/samsum/train.log 2>/dev/null | grep -o 'loss=[0-9a-z.]*' | tail -1)" >> "$OUT/variants.txt"
}
rm -rf /tmp/diag; mkdir -p /tmp/diag
run base X=1 &
run eager LUDWIG_MT_SPEEDUPS_OFF=sdpa_attention &
run nopadfix LUDWIG_MT_PATCHES_OFF=pad_merged_rows_with_the_pad_token &
run noliger LUDWIG_MT_SPEEDUPS_OFF=liger_kernels &
run notargetonly LUDWIG_MT_SPEEDUPS_OFF=target_only_logits &
run noautocast LUDWIG_MT_SPEEDUPS_OFF=bf16_autocast &
wait
cat "$OUT/sdpa.txt" "$OUT/variants.txt"
for n in base eager nopadfix; do tr '\r' '\n' < /tmp/diag/$n/results/samsum/train.log | grep -o 'loss=[0-9a-z.]*' | uniq | head -8 | tr '\n' ' '; echo " <- $n"; done
