#!/usr/bin/env bash
# One call on a lent CUDA machine: the kernel tests compiled for the GPU, then the three benchmarks.
# Logs and tables go to $OUT (default ./gpu-out). Optional: wheels in .whl/ (e.g. the transformers this project
# is tested with) are installed into /tmp/site first; the project itself is installed there without deps.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, report the exit status
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
}

# decode weights: trained on the GPU first (cached in benchmarks/.cache/ for the later decode stages)
PHASES="300x8x128 150x2x512 60x1x2048"
STAGES=${STAGES:-tests mla decode decode_b8 fp8}
for stage in $STAGES; do
  case $stage in
    tests) step tests 200 python3 -m pytest -q -p no:cacheprovider tests/test_mla_decode_kernel.py \
             tests/kernels/test_fp8_quant.py tests/kernels/test_fp8_gemm.py tests/kernels/test_fp8_linear.py \
             tests/test_mla_absorb.py tests/test_mtp_speculative.py ;;
    mla) step mla_decode 150 python3 benchmarks/mla_decode.py ;;
    decode) step decode_bf16 330 python3 benchmarks/decode.py --device cuda --dtype bfloat16 --phases $PHASES \
              --contexts 256 1024 4096 16384 --new-tokens 64 --repeats ${DECODE_REPEATS:-3} ;;
    decode_fp32) step decode_fp32 240 python3 benchmarks/decode.py --device cuda --phases $PHASES \
              --contexts 256 1024 4096 16384 --new-tokens 64 --repeats ${DECODE_REPEATS:-3} ;;
    decode_b8) step decode_bf16_b8 150 python3 benchmarks/decode.py --device cuda --dtype bfloat16 --batch 8 \
              --phases $PHASES --contexts 256 4096 --new-tokens 64 --repeats 3 ;;
    fp8) step fp8_gemm 240 python3 benchmarks/fp8_gemm.py ;;
  esac
done
