#!/usr/bin/env bash
# The GPU checks of the overhead benchmark as ONE call on a lent CUDA host, which has torch and transformers
# but nothing of the sweep's stack and no network (the overhead command needs neither):
#   1. ISOPO on CUDA against the float64 reference on CUDA and on the CPU, and under bf16 autocast, the
#      CUDA-graph tails against the eager layers (tests/test_isopo_device.py); the Triton kernels against
#      float64 and, inside the engine, against the torch path (tests/test_kernels.py);
#   2. `python -m bench overhead` at Qwen3-0.6B shapes, B=8, T=1024, bf16 autocast, every mode (hooks too),
#      ISOPO's layer tails as CUDA graphs and the passes over G as Triton kernels (both the default on CUDA),
#      and on CUDA isopo_ni:paper and isopo_int +cublas too (the torch path: cuBLAS, cuSOLVER);
#   3. reinforce / isopo_ni:paper / isopo_int with the LM head on the response columns (the trainer's step),
#      interleaved in one process with the same two ISOPO modes +eager (every layer eager) and +cublas (the
#      torch path), isopo_int+outer, isopo_int+tma, isopo_int+formgram, isopo_ni:paper+rownorms and
#      isopo_ni:paper+fused (the candidate kernels for the Gram matrix, G with its Gram matrix, the norms, and
#      the norms with the overlap numerators), then one
#      profiled step per mode (profile.txt: where the host's and the device's time
#      goes, the GPU's idle time by phase, by the launch it waited for and by ISOPO host region, and each
#      mode's device time against REINFORCE's, kernel by kernel); on CUDA the same three modes again with the
#      LM head's G held whole (--chunk-mib 4096), into overhead.log only;
#   4. only with COMPILE=1: step 3's three modes with --compile (two warm-up rounds, which compile), stopped
#      after COMPILE_TIMEOUT s (150);
#   5. `python -m bench layer-costs`: each piece of an ISOPO layer's backward at the model's linear shapes,
#      eagerly and from CUDA-graph replays (layer-costs.txt), stopped after LAYER_COSTS_TIMEOUT s (120);
#      then (CUDA only) the Triton kernels' launch settings against the torch operations they replace
#      (`python -m bench.kernel_configs`, appended to layer-costs.txt row by row), stopped after
#      KERNEL_CONFIGS_TIMEOUT s (180; its rows end with the formation-with-Gram candidates),
#      and the LM head's matmuls of both statistics routes, with and without aligned outputs
#      (`python -m bench.matmul_probe`, appended too), stopped after 60 s;
#   6. the host-cost micro-benchmark on this host's CPU (bench/test_bench_isopo_host.py, ~15 s, appended to
#      overhead.log): how this host's Python compares with the CPU where the host-side work is measured;
#   7. the scaling sweep of reinforce / isopo_ni:paper / isopo_int (SCALING_T at B=SCALING_AT_B, default
#      256..4096 at B=4; SCALING_B at T=SCALING_AT_T, default 4..32 at T=512: B=8 × T=4096 runs REINFORCE
#      itself out of an 80 GB card; 3 timed rounds) with SCALING_FLAGS (default none; e.g. --no-cuda-graphs),
#      stopped after SCALING_TIMEOUT s (180); its JSON is rewritten after every point, so it keeps what it has.
# Every overhead run also counts each mode's FLOPs in one eager, torch-path step after its timed rounds
# (`gflop`, `flop_ratio_vs_reinforce` in the JSON; ~25 such steps in steps 2-3, not yet timed on a GPU: an
# estimated ~30 s in all, which steps 5-7 give up through the budget below).
# Steps 5-7 are also stopped when the call has run BUDGET_S seconds (560), so that it ends inside the lent
# machine's 600 s per command with every file written; machine.txt ends with the call's seconds.
# Usage, from the repository root: bash bench/device_check.sh [OUT]   (default OUT: results/overhead/cuda)
# Writes machine.txt, device_tests.log, overhead.log, profile.txt, layer-costs.txt and three JSON files into
# OUT (eight files, as many as a lent machine sends back; nine with COMPILE=1); exits 1 if any step failed.
# DEVICE, MODEL and REPEATS override the defaults (DEVICE=cpu MODEL=tiny to try it here; step 3 then runs its
# three plain modes). On an H200 the whole call took 393 s at d2fd120 (2026-11-27, session 14, with BUDGET_S=530;
# the runs added since, three more modes in step 3 and the whole-G run, take ~70 s more), plus ~30–60 s to start
# the machine; a CPU dry run (DEVICE=cpu MODEL=tiny REPEATS=2 BUDGET_S=150 PYTHON=.venv/bin/python) took 379 s at
# 9045017 (2026-12-07; step 1's 107 tests under Triton's interpreter 238 s of it), 7 files: steps 5-7 had no
# budget left (layer-costs.txt empty), so it exits 1 there.
set -uo pipefail
out="${1:-results/overhead/cuda}"
device="${DEVICE:-cuda}"
model="${MODEL:-qwen3-0.6b}"
repeats="${REPEATS:-10}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
started=$(date +%s)
budget="${BUDGET_S:-560}"
# A step's timeout: its own cap, or what is left of the budget (at least 1 s: `timeout 0` would not stop it),
# so that the whole call ends inside the lent machine's 600 s per command and every file comes back.
cap() { local left=$(( budget - ($(date +%s) - started) )); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    git rev-parse --short HEAD 2>/dev/null || true
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    "$py" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$out/machine.txt" || status=1

"$py" -m pytest -q -p no:cacheprovider tests/test_isopo_device.py tests/test_kernels.py 2>&1 | tee "$out/device_tests.log" || status=1

stem="$model-$device-B8-T1024"
three=reinforce,isopo_ni:paper,isopo_int
switched=$three
every=reinforce,isopo_ni:paper,isopo_ni:overlap,isopo_ni:rel_overlap,isopo_int,isopo_ni_hooks,isopo_int_hooks
if [ "$device" = cuda ]; then
    switched=$three,isopo_ni:paper+eager,isopo_int+eager,isopo_ni:paper+cublas,isopo_int+cublas,isopo_int+outer,isopo_int+tma,isopo_int+formgram,isopo_ni:paper+rownorms,isopo_ni:paper+fused
    every=$every,isopo_ni:paper+cublas,isopo_int+cublas
fi
overhead() { "$py" -m bench overhead --device "$device" --model "$model" "$@" 2>&1 | tee -a "$out/overhead.log"; }
overhead --repeats "$repeats" --modes "$every" --json "$out/$stem.json" || status=1
overhead --repeats "$repeats" --lm-head response --modes "$switched" --json "$out/$stem-lmhead-response.json" \
    --profile "$out/profile.txt" || status=1
# The LM head's G held whole (2.4 GiB at Qwen3-0.6B) instead of formed twice in blocks: time against memory
# (overhead.log only: a lent machine sends back eight files).
[ "$device" = cuda ] && { overhead --repeats "$repeats" --lm-head response --modes "$three" --chunk-mib 4096 || status=1; }
if [ "${COMPILE:-0}" = 1 ]; then
    timeout "$(cap "${COMPILE_TIMEOUT:-150}")" bash -c "set -o pipefail; $(declare -f overhead); py=$py device=$device model=$model out=$out; \
        overhead --repeats $repeats --warmup 2 --lm-head response --modes $three --compile \
        --json $out/$stem-lmhead-response-compile.json" || status=1
fi
# The rest is capped by what is left of BUDGET_S, in the order of what the next decision needs most: the
# pieces' GPU times, this host's Python, then the scaling sweep (which keeps the points it finished).
timeout "$(cap "${LAYER_COSTS_TIMEOUT:-120}")" "$py" -m bench layer-costs --device "$device" --model "$model" 2>&1 \
    | tee "$out/layer-costs.txt" || status=1
if [ "$device" = cuda ]; then
    timeout "$(cap "${KERNEL_CONFIGS_TIMEOUT:-180}")" "$py" -m bench.kernel_configs --model "$model" --repeats 20 2>&1 \
        | tee -a "$out/layer-costs.txt" || status=1
    timeout "$(cap 60)" "$py" -m bench.matmul_probe 2>&1 | tee -a "$out/layer-costs.txt" || status=1
fi
timeout "$(cap 120)" "$py" -m pytest -q -p no:cacheprovider bench/test_bench_isopo_host.py --benchmark-enable \
    --benchmark-columns=min,median 2>&1 | tee -a "$out/overhead.log" || status=1
timeout "$(cap "${SCALING_TIMEOUT:-180}")" bash -c "set -o pipefail; $(declare -f overhead); py=$py device=$device model=$model out=$out; \
    overhead --repeats 3 --lm-head response --scaling --batch ${SCALING_AT_B:-4} --seq-len ${SCALING_AT_T:-512} \
    --scaling-T ${SCALING_T:-256,512,1024,2048,4096} --scaling-B ${SCALING_B:-4,8,16,32} ${SCALING_FLAGS:-} \
    --json $out/scaling-$model-$device-lmhead-response.json" || status=1
echo "device_check: $(( $(date +%s) - started )) s" | tee -a "$out/machine.txt"

exit "$status"
