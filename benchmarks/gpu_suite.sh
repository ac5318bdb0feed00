#!/usr/bin/env bash
# Every GPU figure darec reports, in one command, from the repository root of a CUDA machine:
#
#   bash benchmarks/gpu_suite.sh [tests|train|inference|search|all]     (default all)
#
# Stages (each fits one 10-minute device call; `all` runs them in order):
#   tests      pytest -m gpu: the fused Triton search equals plain torch on CUDA, CUDA training paths
#   train      training samples/s, DARE and TWIN at dim 16 and 128, batch 2,048 to 32,768,
#              row-sparse vs dense Adam (Taobao-sized vocabulary)          -> train_throughput_cuda.json
#              and, where torchrec + fbgemm-gpu import, torchrec tables with fused Adam
#                                                                  -> train_throughput_torchrec_cuda.json
#   inference  Scorer per request and fused vs plain search on 1 x 1,000 x 10^4 and 64 x 100 x 10^4
#              (users x candidates x history) at K_A 16 to 128, peak training memory -> inference_cuda.json
#   search     every baseline's search at N = 200 / 1,000 / 10,000          -> search_speed_cuda.json
# Results land in benchmarks/results/ and, when $OUT is set (the device tool), are copied there too.
# On the lent machine: run benchmarks/gpu_wheels.sh here first and carry `.whl`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
stage=${1:-all}
case "$stage" in tests|train|inference|search|all) ;; *) echo "gpu_suite.sh: unknown stage '$stage' (tests|train|inference|search|all)" >&2; exit 2 ;; esac

run_stage() {
    case "$1" in
        tests) $PY -m pytest -m gpu -q -p no:cacheprovider tests ;;
        train) $PY benchmarks/train_throughput.py --device cuda --preset dare twin --dim 16 128 \
                   --batch-size 2048 8192 32768 --sparse-optimizer both --steps 50 --warmup 10
               if $PY -c "import torchrec, fbgemm_gpu" 2>/dev/null; then
                   $PY benchmarks/train_throughput.py --device cuda --preset dare --dim 16 128 --batch-size 8192 32768 \
                       --embedding-backend torchrec --embedding-optimizer adam --steps 50 --warmup 10 \
                       --name train_throughput_torchrec_cuda
               else
                   echo "train: torchrec / fbgemm-gpu not importable here: torchrec tables not timed (docs/scale.md)"
               fi ;;
        inference) $PY benchmarks/inference.py --device cuda --dim 128 --attention-dims 128 64 32 16 \
                   --candidates 1000 --lengths 10000 --batch-users 64 --batch-candidates 100 --batch-length 10000 ;;
        search) $PY benchmarks/search_speed.py --device cuda --out "$RESULTS/search_speed_cuda.json" ;;
    esac
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/gpu_suite_env_cuda.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$RESULTS/gpu_suite_env_cuda.txt"
if [ "$stage" = all ]; then
    for s in tests train inference search; do echo "== $s"; run_stage "$s"; done
else
    run_stage "$stage"
fi
if [ -n "${OUT:-}" ]; then cp "$RESULTS"/*_cuda.json "$RESULTS/gpu_suite_env_cuda.txt" "$OUT"/ 2>/dev/null || true; fi
