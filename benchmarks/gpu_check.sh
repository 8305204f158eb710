#!/usr/bin/env bash
# The prepared device check of issue #23 (one call, ~8 minutes of GPU time): the CUDA tests of the paged
# attention kernel and of CUDA graphs (graphs == eager, token for token, steered), then bench_gpu.py.
# Usage on a lent GPU machine, from the repository root:  bash benchmarks/gpu_check.sh
# Output also goes to $OUT/ when that is set (the device tool brings it back).
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 240 python -m pytest -q -p no:cacheprovider -x \
    tests/kernels/test_paged_attention.py tests/runner/test_cuda_graphs.py tests/runner/test_padded_decode.py \
    2>&1 | tee "$out/gpu_tests.log" | tail -25
timeout 330 python benchmarks/bench_gpu.py --device cuda --dtype bfloat16 --vllm 2>&1 \
    | grep -v "Loading weights" | tee "$out/bench_gpu.log" | tail -30
