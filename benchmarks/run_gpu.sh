#!/usr/bin/env bash
# The GPU figures of issue 7 as one command: full-size SD1.5 ControlNet at 512 px with random weights, ours
# beside diffusers in one process (benchmarks/gpu_suite.py), printed and written as a markdown table.
#
#   bash benchmarks/run_gpu.sh [TABLE.md] [gpu_suite options, e.g. --stages train sample]
#   bash benchmarks/run_gpu.sh --sdxl-lllite [TABLE.md]
#
# --sdxl-lllite measures instead the SDXL + LLLite training step of issue 13 at 1024 px, batch 1: bf16 autocast
# over a bf16 frozen base, gradient checkpointing, cached latents and text (the 24 GB recipe of docs/sdxl.md;
# AdamW, as 8-bit AdamW would save only 0.14 GB on LLLite's 23 M weights and needs bitsandbytes): peak memory
# and steps/s. It builds the model in float32 first, about 15 GB.
#
# TABLE.md defaults to $OUT/gpu_results.md when $OUT is set, else benchmarks/gpu_results.md. Meant to take
# under 4 minutes on an H100, most of it torch.compile in the last stage (not yet run on one); the time of
# each stage is printed, and --stages runs a subset.
#
# Needs python3 (or $PYTHON) with a CUDA build of torch. Only if our imports fail does it install packages:
# from the wheels in $WHEELS (default .whl/) when there are any, for machines without a network, else with
# `pip install -r requirements.txt`. Make those wheels on an x86-64 Linux machine with a network (all are
# pure Python but wcwidth, an abi3 wheel), about 9 MB:
#
#   bash benchmarks/run_gpu.sh --fetch-wheels .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then
    # the pins of requirements.txt for the packages a plain CUDA+torch image lacks, and open_clip's ftfy
    pins=$(grep -E '^(omegaconf|open-clip-torch|diffusers)==' requirements.txt | cut -d' ' -f1)
    exec "$PY" -m pip download --no-deps --only-binary=:all: -d "${2:-.whl}" $pins ftfy wcwidth
fi

sdxl_lllite=
if [ "${1:-}" = "--sdxl-lllite" ]; then sdxl_lllite=1; shift; fi
table=
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then table=$1; shift; fi
table=${table:-${OUT:+$OUT/gpu_results.md}}
table=${table:-benchmarks/gpu_results.md}
imports='import torch, omegaconf, open_clip, diffusers, pytorch_lightning, einops, cv2, safetensors'
if ! "$PY" -c "$imports" 2>/dev/null; then
    wheels=${WHEELS:-.whl}
    if compgen -G "$wheels/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/run_gpu_site "$wheels"/*.whl
        export PYTHONPATH=/tmp/run_gpu_site${PYTHONPATH:+:$PYTHONPATH}
    else
        "$PY" -m pip install -q -r requirements.txt
    fi
    "$PY" -c "$imports"
fi
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible to torch"'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'

export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if [ -n "$sdxl_lllite" ]; then
    exec "$PY" benchmarks/bench_train.py --config models/cldm_xl_lllite.yaml --peer none --device cuda \
        --resolution 1024 --batch 1 --precision bf16-mixed --frozen_dtype bf16 --gradient_checkpointing --cached \
        --warmup 2 --steps 5 --rounds 1 --table "$table"
fi
"$PY" benchmarks/gpu_suite.py --table "$table" "$@"
