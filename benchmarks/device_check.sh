#!/usr/bin/env bash
# What only a GPU can show, for one call of a lent device (about 10 minutes; each part time-limited, in order of
# value, each writing its result as soon as it has one):
#   1. the loop's stage-1 and stage-2 step against the bare passes, eager (the 1.25x goal), with profiles of
#      two steps of the bare passes and of stage 1 (set-up and first step excluded) beside the result;
#   2. stage 2 with compiled blocks (compile: inductor), against eager bare passes of the same run;
#   3. stage 2 under FSDP2 through configs/accelerate/fsdp.yaml in one process (accelerate's own FSDP routing on a
#      GPU, sharded parameters in fused AdamW, the gather at the end), at SD3-Medium scale.
#
#   bash benchmarks/device_check.sh OUT_DIR        (the parts' limits add up to 9 minutes)
#   bash benchmarks/device_check.sh OUT_DIR --tiny --steps 1    (a dry run of the script on CPU: extra arguments
#                                                                go to every benchmarks/gpu_step.py call)
#
# The lent machine has its own torch but not all of dmdr's pinned pure-Python packages, and reaches no index: fetch
# them here first, then carry the folder and install it there (the device tool's `carry` and `$OUT`):
#   pip download --no-deps -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 accelerate==1.15.0 \
#       ftfy wcwidth importlib_metadata
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
#   HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 bash benchmarks/device_check.sh "$OUT"
set -u
out=${1:?usage: device_check.sh OUT_DIR [gpu_step.py arguments]}
shift
mkdir -p "$out"
part() {  # part NAME SECONDS COMMAND...: run it with a time limit, keep its log, show its tail
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "exit $? after $((SECONDS - start)) s" | tee -a "$out/$name.log"
    grep -v -i "warn" "$out/$name.log" | tail -8
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU"; } | tee "$out/device.txt"
part eager 240 python benchmarks/gpu_step.py --no-sampling --rows stage1 stage2 --profile --out "$out/gpu_step.txt" "$@"
part compiled 210 python benchmarks/gpu_step.py --no-sampling --compile --rows stage2 --out "$out/gpu_step_compiled.txt" "$@"
part fsdp 90 python -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 \
    benchmarks/gpu_step.py --no-sampling --rows stage2 --out "$out/gpu_step_fsdp.txt" "$@"
