#!/usr/bin/env bash
# What only a GPU can show, for one call of a lent device (about 8 minutes; each part time-limited, in order of
# value, each writing its result as soon as it has one; the seconds are what each took on a lent H200, 2026-11-27):
#   eager: the loop's stage-1 and stage-2 step in mixed_precision bf16-weights (bf16 weights without autocast, fp32
#      masters) against the bare passes of the reference setting (the 1.25x goal), eager, with profiles of
#      two steps of the bare passes and of stage 1 (set-up and first step excluded) beside the result, as tables and
#      as timelines (`profile_*.json.gz`, and benchmarks/trace_gaps.py's reading of each beside it: where the GPU
#      waits in stage 1 and what the host does meanwhile, which the tables do not show), host readings of the bare
#      passes and of both stages (`host_*.txt`, benchmarks/host_samples.py: the host's time by the Python frame that
#      spends it, and its waits for the GPU by the frame that makes them), and the 1024 px sampling latencies
#      (4-step generator against 28- and 50-step CFG) (191 s);
#   capped: stage 2 as in eager, the process held to 48 GB of GPU memory, the caching allocator included (the goal's
#      fit: on a large card the allocator reserves more than the step allocates) (52 to 65 s);
#   unchunked: stage 2, full-fine-tune and LoRA-64 generator, in bf16-weights with reward_chunk 0: the decoder run
#      once forward and once backward instead of chunked and recomputed (a third fewer of its FLOPs,
#      benchmarks/flop_count.py), for its time and whether its peak fits 48 GB;
#   (not in the default list) fsdp: stage 2 under FSDP2 through configs/accelerate/fsdp.yaml in one process
#      (accelerate's own FSDP routing on a GPU, sharded parameters in fused AdamW, the gather at the end), at
#      SD3-Medium scale, in bf16-weights (FSDP's own mixed precision: fp32 shards gathered in bf16, no master copy),
#      against eager (93 s);
#   compiled: stage 2 in bf16-weights with compiled blocks (compile: inductor) (153 s);
#   autocast: stage 2 in mixed_precision bf16 (autocast over fp32 trained weights) (55 s);
#   deepspeed: stage 2 under DeepSpeed ZeRO-2 through configs/accelerate/deepspeed.yaml in one process (an engine per
#      trained model, DeepSpeed's bf16 with fp32 masters in its partitions), against eager.
#
#   bash benchmarks/device_check.sh OUT_DIR        (eager, capped, unchunked: their limits add up to 8 minutes)
#   PARTS="eager autocast deepspeed" bash benchmarks/device_check.sh OUT_DIR     (the named parts, in that order)
#   bash benchmarks/device_check.sh OUT_DIR --tiny --steps 1    (a dry run of the script on CPU: extra arguments
#                                go to every benchmarks/gpu_step.py call; accelerate routes FSDP and DeepSpeed only
#                                to GPUs, so on CPU those parts run the plain loop; on a GPU the loop says which ran)
#
# The lent machine has its own torch but not all of dmdr's pinned pure-Python packages, and reaches no index: fetch
# them here first, then carry the folder and install it there (the device tool's `carry` and `$OUT`):
#   pip download --no-deps -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 accelerate==1.15.0 peft==0.21.2 \
#       transformers==5.24.0 ftfy wcwidth importlib_metadata
# and for the deepspeed part (the image has its other needs; deepspeed's wheel is pure Python, built here):
#   pip wheel --no-deps -w .whl deepspeed==0.19.8
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl hjson pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
#       typing-inspection
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
#   HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 timeout 580 bash benchmarks/device_check.sh /tmp/res
#   tar czf "$OUT/device_check.tgz" -C /tmp/res .    (the device tool brings back at most 8 files, 16 MiB each: if
#                                                     the archive is larger, bring the timelines back as files)
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
parts=${PARTS:-eager capped unchunked}
for name in $parts; do
    case $name in
    eager|capped|fsdp|unchunked|compiled|autocast|deepspeed) ;;
    *) echo "unknown part '$name' in PARTS"; exit 2 ;;
    esac
done
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU"; } | tee "$out/device.txt"
launch=(python3 -m accelerate.commands.launch --num_processes 1 --config_file)  # one process under a config
stage2=(benchmarks/gpu_step.py --no-sampling --rows stage2)
for name in $parts; do
    case $name in
    eager) part eager 260 python3 benchmarks/gpu_step.py --rows stage1 stage2 --precision bf16-weights \
        --profile --out "$out/gpu_step.txt" "$@"
        for trace in "$out"/profile_*.json.gz; do  # where the GPU waits, in text beside each timeline
            [ -e "$trace" ] && timeout 60 python3 benchmarks/trace_gaps.py "$trace" >"${trace%.json.gz}_gaps.txt"
        done ;;
    capped) part capped 90 python3 "${stage2[@]}" --precision bf16-weights --memory-cap 48 \
        --out "$out/gpu_step_capped.txt" "$@" ;;
    autocast) part autocast 100 python3 "${stage2[@]}" --precision bf16 --out "$out/gpu_step_autocast.txt" "$@" ;;
    compiled) part compiled 180 python3 "${stage2[@]}" --compile --precision bf16-weights \
        --out "$out/gpu_step_compiled.txt" "$@" ;;
    unchunked) part unchunked 140 python3 benchmarks/gpu_step.py --no-sampling --rows stage2 stage2-lora \
        --precision bf16-weights --reward-chunk 0 --out "$out/gpu_step_unchunked.txt" "$@" ;;
    fsdp|deepspeed) part "$name" 150 "${launch[@]}" "configs/accelerate/$name.yaml" "${stage2[@]}" \
        --precision bf16-weights --out "$out/gpu_step_$name.txt" "$@" ;;
    esac
done
