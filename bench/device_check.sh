#!/usr/bin/env bash
# The GPU checks of the overhead benchmark as ONE call on a lent CUDA host, which has torch and transformers
# but nothing of the sweep's stack and no network (the overhead command needs neither):
#   1. ISOPO on CUDA against the float64 reference on CUDA and on the CPU, and under bf16 autocast
#      (tests/test_isopo_device.py);
#   2. `python -m bench overhead` at Qwen3-0.6B shapes, B=8, T=1024, bf16 autocast, every mode (hooks too);
#   3. reinforce / isopo_ni:paper / isopo_int with the LM head on the response columns (the trainer's step),
#      then one profiled step per mode (profile.txt: where the host's and the device's time goes);
#   4. step 3 with --cuda-graphs (each layer's small-tensor tail replayed as one CUDA graph; two warm-up
#      rounds, which capture), with its own profile (profile-graphs.txt), stopped after GRAPHS_TIMEOUT s (150);
#   5. only with COMPILE=1: step 3 with --compile (two warm-up rounds, which compile), stopped after
#      COMPILE_TIMEOUT s (150);
#   6. the scaling sweep of step 3's modes (SCALING_T at B=8, default 256..2048; SCALING_B at T=1024, default
#      4..16: B=8 × T=4096 runs REINFORCE itself out of an 80 GB card; 3 timed rounds) with SCALING_FLAGS
#      (default none; e.g. --cuda-graphs), stopped after SCALING_TIMEOUT s (180); its JSON is rewritten after
#      every point, so it keeps what it has.
# Usage, from the repository root: bash bench/device_check.sh [OUT]   (default OUT: results/overhead/cuda)
# Writes machine.txt, device_tests.log, overhead.log, profile.txt, profile-graphs.txt and four JSON files
# into OUT (nine files; ten with COMPILE=1; seven on a CPU dry run); exits 1 if any step failed. DEVICE, MODEL and REPEATS override
# the defaults (DEVICE=cpu MODEL=tiny to try it here: step 4, which needs CUDA, is then skipped). On an
# H100 the call with the compile step instead of step 4 took 268 s with REPEATS=8 COMPILE_TIMEOUT=90
# SCALING_TIMEOUT=75 (2026-11-26), plus ~30 s to start the machine.
set -uo pipefail
out="${1:-results/overhead/cuda}"
device="${DEVICE:-cuda}"
model="${MODEL:-qwen3-0.6b}"
repeats="${REPEATS:-10}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    git rev-parse --short HEAD 2>/dev/null || true
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    "$py" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$out/machine.txt" || status=1

"$py" -m pytest -q -p no:cacheprovider tests/test_isopo_device.py 2>&1 | tee "$out/device_tests.log" || status=1

stem="$model-$device-B8-T1024"
three=reinforce,isopo_ni:paper,isopo_int
overhead() { "$py" -m bench overhead --device "$device" --model "$model" "$@" 2>&1 | tee -a "$out/overhead.log"; }
overhead --repeats "$repeats" --json "$out/$stem.json" || status=1
overhead --repeats "$repeats" --lm-head response --modes "$three" --json "$out/$stem-lmhead-response.json" \
    --profile "$out/profile.txt" || status=1
if [ "$device" = cuda ]; then
    timeout "${GRAPHS_TIMEOUT:-150}" bash -c "set -o pipefail; $(declare -f overhead); py=$py device=$device model=$model out=$out; \
        overhead --repeats $repeats --warmup 2 --lm-head response --modes $three --cuda-graphs \
        --json $out/$stem-lmhead-response-graphs.json --profile $out/profile-graphs.txt" || status=1
else
    echo "step 4 skipped: --cuda-graphs needs --device cuda" | tee -a "$out/overhead.log"
fi
if [ "${COMPILE:-0}" = 1 ]; then
    timeout "${COMPILE_TIMEOUT:-150}" bash -c "set -o pipefail; $(declare -f overhead); py=$py device=$device model=$model out=$out; \
        overhead --repeats $repeats --warmup 2 --lm-head response --modes $three --compile \
        --json $out/$stem-lmhead-response-compile.json" || status=1
fi
timeout "${SCALING_TIMEOUT:-180}" bash -c "set -o pipefail; $(declare -f overhead); py=$py device=$device model=$model out=$out; \
    overhead --repeats 3 --lm-head response --scaling --scaling-T ${SCALING_T:-256,512,1024,2048} \
    --scaling-B ${SCALING_B:-4,8,16} ${SCALING_FLAGS:-} \
    --json $out/scaling-$model-$device-lmhead-response.json" || status=1

exit "$status"
