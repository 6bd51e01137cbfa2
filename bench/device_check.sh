#!/usr/bin/env bash
# The GPU checks of the overhead benchmark as ONE call on a lent CUDA host, which has torch and transformers
# but nothing of the sweep's stack and no network (the overhead command needs neither):
#   1. ISOPO on CUDA against the CPU float64 reference, and under bf16 autocast (tests/test_isopo_device.py);
#   2. `python -m bench overhead` at Qwen3-0.6B shapes, B=8, T=1024, bf16 autocast, every mode (hooks too);
#   3. the same with the LM head on the response columns (the trainer's step), reinforce / isopo_ni / isopo_int;
#   4. step 3 again with --chunk-mib 4096, so the LM head's per-sequence gradients are kept whole (is the
#      default 256 MiB chunking, which makes the weight gradient one more matmul, what costs the time?);
#   5. the scaling sweep (T 256..4096 at B=8, B 4..32 at T=1024) of step 3's modes, stopped after
#      SCALING_TIMEOUT seconds (default 180); its JSON is rewritten after every point, so it keeps what it has.
# Usage, from the repository root: bash bench/device_check.sh [OUT]   (default OUT: results/overhead/cuda)
# Writes machine.txt, device_tests.log, overhead.log and four JSON files into OUT (seven files); exits 1
# if any step failed. DEVICE, MODEL and REPEATS override the defaults (DEVICE=cpu MODEL=tiny to try it here).
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
"$py" -m bench overhead --device "$device" --model "$model" --repeats "$repeats" \
    --json "$out/$stem.json" 2>&1 | tee "$out/overhead.log" || status=1
"$py" -m bench overhead --device "$device" --model "$model" --repeats "$repeats" --lm-head response \
    --modes reinforce,isopo_ni:paper,isopo_int --json "$out/$stem-lmhead-response.json" 2>&1 \
    | tee -a "$out/overhead.log" || status=1
"$py" -m bench overhead --device "$device" --model "$model" --repeats "$repeats" --lm-head response \
    --modes reinforce,isopo_ni:paper,isopo_int --chunk-mib 4096 --json "$out/$stem-lmhead-response-chunk4096.json" \
    2>&1 | tee -a "$out/overhead.log" || status=1
timeout "${SCALING_TIMEOUT:-180}" "$py" -m bench overhead --device "$device" --model "$model" --repeats 5 \
    --lm-head response --scaling --json "$out/scaling-$model-$device-lmhead-response.json" 2>&1 \
    | tee -a "$out/overhead.log" || status=1

exit "$status"
