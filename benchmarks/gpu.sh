#!/usr/bin/env bash
# The GPU figures of issue 4, for a lent H100/H200 whose image has torch + transformers but not diffusers.
#
#   bash benchmarks/gpu.sh prepare        # here (network): diffusers' wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu.sh run CASE...    # there, one device call per few cases (10 minutes a call), e.g.
#       run full-576 full-576-unet        # 576x320x24: pipeline + UNet TFLOP/s
#       run full-576-compile full-256 full-256-64-offload
#       run turbo train-temporal train-temporal-gc train-all   # issue 12 turbo ratio, issue 15 training memory
# Results: one JSON per case under ${OUT:-/tmp/out} and the printed tables; copy them into RESULTS.md.
# With the device tool: carry [".whl"]; the random full-size checkpoint is built once per machine (/tmp/ckpt-full).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers==0.42.1 importlib_metadata
    ls .whl
    ;;
run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
    out="${OUT:-/tmp/out}"
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
        | tee -a "$out/gpu.txt"
    for name in "$@"; do
        case "$name" in
        full-576) args=(--case full-576) ;;
        full-576-unet) args=(--case full-576 --unet-only) ;;
        full-576-compile) args=(--case full-576 --compile) ;;
        full-256) args=(--case full-256) ;;
        full-256-64-offload) args=(--case full-256-64-offload) ;;
        turbo)  # 4-step t2v-turbo vs 25-step dpmpp-2m with CFG, 16x256x256, fp16
            python3 benchmarks/bench_adapters.py turbo --config full --device cuda --dtype float16 --repeats 3 \
                --checkpoint /tmp/ckpt-full | tee "$out/$name.txt"
            continue ;;
        train-temporal | train-temporal-gc | train-all)  # peak memory of LoRA training, 16x256x256, fp16
            target=${name#train-}; target=${target%-gc}
            python3 benchmarks/train_memory.py --checkpoint /tmp/ckpt-full --target "$target" \
                $([ "${name%-gc}" != "$name" ] && echo --gradient-checkpointing) | tee "$out/$name.txt"
            continue ;;
        *) echo "unknown case $name" >&2; exit 2 ;;
        esac
        # every full-* case is the same architecture: one random checkpoint (written on first use)
        python3 benchmarks/bench.py "${args[@]}" --device cuda --dtype float16 --rounds 2 \
            --checkpoint /tmp/ckpt-full | tee "$out/$name.txt"
    done
    ;;
*)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
