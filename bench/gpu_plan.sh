#!/usr/bin/env bash
# One device-tool call: the GPU tests and the benchmark figures BENCHMARKS.md is waiting for,
# each step's log under $OUT, a one-line summary per step on stdout. Steps run in order; name
# some to run only those (default: all). Needs the ignored .gpu/ kit (prelude, wheels, the
# default model's tokenizer in .gpu/tokenizer, CUDA headers in .gpu/cuda):
#
#   . .gpu/prelude.sh && bash bench/gpu_plan.sh [tests|alltests] [decode1b] [decode8b] [prefill8b] [lora] [loraprof] [awq] [awqmma]
#
# Budget: tests ~3 min, decode1b ~4 min, decode8b ~3 min, prefill8b ~2 min, lora ~2 min, loraprof ~2 min,
# awq ~2 min, awqmma ~6 min (the repacked W4A16 kernel: its GPU tests, the kernel table, 8B batch-1 decode) on an H100.
set -u
out=${OUT:-/tmp/lmq-gpu}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} CUDA_PATH=${CUDA_PATH:-$PWD/.gpu/cuda}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests decode1b decode8b lora awq)
tok=.gpu/tokenizer

run() {  # name, command...
  local name=$1
  shift
  local start=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  echo "$name: rc=$? in $((SECONDS - start)) s; $(tail -n 1 "$out/$name.log")"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for step in "${steps[@]}"; do
  case $step in
    tests) run tests python3 -m pytest -q -m gpu tests/test_gpu_turbomind.py tests/test_gpu_parity.py ;;
    alltests) run alltests python3 -m pytest -q -m gpu tests/ ;;  # every GPU file (auto is turbomind there)
    decode1b) run decode1b python3 bench/turbomind_decode.py --shape 1b --tokenizer $tok \
      --backends turbomind turbomind-async pytorch pytorch-async hf --json "$out/decode1b.json" ;;
    decode8b) run decode8b python3 bench/turbomind_decode.py --shape 8b --tokenizer $tok --batch-sizes 1 128 \
      --backends turbomind turbomind-async pytorch --skip-attention --awq --prefill 2048 --json "$out/decode8b.json" ;;
    prefill8b) run prefill8b python3 bench/turbomind_decode.py --shape 8b --tokenizer $tok --batch-sizes 1 \
      --output-len 16 --backends turbomind pytorch --skip-attention --prefill 2048 --json "$out/prefill8b.json" ;;
    lora) run lora python3 bench/lora.py --random-1b --tokenizer $tok --backend turbomind --num-adapters 8 64 \
      --peft-batches 0 --json "$out/lora.json" ;;
    loraprof) run loraprof python3 bench/profile_decode.py --random-1b --tokenizer $tok --backends turbomind \
      --batch-sizes 32 --adapters 0 8 32 --json "$out/loraprof.json" --tables "$out/loraprof.txt" ;;
    awq) run awq python3 bench/awq_gemm.py --iters 30 --json "$out/awq_gemm.json" ;;
    awqmma)
      run awqmma_tests python3 -m pytest -q -m gpu tests/test_gpu_turbomind.py -k awq
      run awq python3 bench/awq_gemm.py --iters 20 --rows 1 8 16 64 128 512 2048 --json "$out/awq_gemm.json"
      run awq8b python3 bench/turbomind_decode.py --shape 8b --tokenizer $tok --batch-sizes 1 --backends turbomind \
        --skip-attention --awq --json "$out/awq8b.json" ;;
    *) echo "unknown step $step (tests alltests decode1b decode8b prefill8b lora loraprof awq awqmma)" ;;
  esac
done
