#!/usr/bin/env bash
# The GPU figures of issue 7 as one command: full-size SD1.5 ControlNet at 512 px with random weights, ours
# beside diffusers in one process (benchmarks/gpu_suite.py), printed and written as a markdown table.
#
#   bash benchmarks/run_gpu.sh [TABLE.md] [gpu_suite options, e.g. --stages train sample]
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
"$PY" benchmarks/gpu_suite.py --table "$table" "$@"
