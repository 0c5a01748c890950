#!/usr/bin/env bash
# Every GPU table of docs/fp8.md and docs/benchmarks.md in ONE call (< 8 minutes on an H100 / H200):
#   env          chip, driver, torch / CUDA / triton / transformers / torchao versions
#   fp8_gemm     FP8 GEMM at DeepSeek-V3 shapes, M = 4096-16384: dispatched vs torch BF16 vs scaled_mm vs our
#                Triton (vs torchao), TFLOP/s and % of dense FP8 peak; the dispatch rule is measured first (--tune)
#   fp8_linear   FP8Linear forward + backward vs BF16 nn.Linear, same shapes, M = 8192
#   fp8_train    training steps of a 1.1B DeepSeek-V3-shaped model, FP8 vs BF16: step-time ratio, loss after 20 steps
#   mla_decode   MLA decode kernel variants at V3 dims (H=128, r=512, dr=64), bf16 and fp8 latent cache, batch x
#                context: best variant's GB/s and % of HBM bandwidth; the best per shape becomes the decode rule
#   decode       MTP self-speculative decoding at batch 1 and 8, k = 1, 2, 3, vs absorbed decode
#   tests        the dispatch / kernel-variant tests compiled for the GPU (last: whatever time is left)
# Logs go to $OUT (default ./gpu-out): env.txt and one .log per part, plus kernel_rules.json (the measured rules;
# copy it to kernels/measured_rules.json to ship them). At most 8 files.
#
#   bash benchmarks/run_on_gpu.sh            # CUDA machine; optional wheels in .whl/ (e.g. torchao) are installed first
#   bash benchmarks/run_on_gpu.sh --smoke    # CPU, Triton interpreter, tiny shapes: the same steps end to end (~10 min
#                                            # on a small shared CPU), to catch mistakes before spending GPU time
# Environment: OUT, BUDGET_S (seconds for all steps, default 440; a step that would start with < 20 s left is skipped,
# each step is capped at min(its own cap, what is left)), PYTHON (default python3), STAGES (subset, e.g. "mla decode").
set -uo pipefail
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-440}
START=$SECONDS
export PYTHONUNBUFFERED=1
export DEEPSEEK_V3_RULE_CACHE="$OUT/kernel_rules.json"

if [[ $SMOKE == 1 ]]; then
  export TRITON_INTERPRET=1
  SMOKEFLAG=--smoke
  WEIGHTS=(--weights-dir "$(mktemp -d)/decode-weights")
else
  export TRITON_INTERPRET=0
  SMOKEFLAG=
  WEIGHTS=()  # decode.py's default cache, named by the training recipe
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site
fi

{
  date -u
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  fi
  $PY - <<'EOF'
import torch, transformers, triton
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| triton", triton.__version__,
      "| transformers", transformers.__version__)
try:
    import torchao
    print("torchao", torchao.__version__)
except Exception as err:
    print("torchao not importable:", type(err).__name__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("chip", torch.cuda.get_device_name(), "| sm", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| memory", f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("chip: none (CPU run, TRITON_INTERPRET=1)")
EOF
} 2>&1 | grep -v "Failed to load\|register_constant" | tee "$OUT/env.txt"

step() {  # step NAME CAP_S CMD...: run with timeout min(CAP_S, budget left), append to $OUT/NAME.log, show its tail
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if (( left < 20 )); then
    echo "=== $name: SKIPPED (budget of ${BUDGET}s spent)" | tee -a "$OUT/$name.log"
    return
  fi
  local limit=$(( cap < left ? cap : left ))
  [[ $SMOKE == 1 ]] && limit=1800  # the interpreter is slow; the GPU caps are what matter
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/$name.log"
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
  grep -v "Failed to load\|register_constant\|FutureWarning\|causal_mask = \|are deprecated" "$OUT/$name.log" \
    | grep -v "UNEXPECTED" | grep "^|\|^device\|^step-time\|B parameters\|^- \|rejected\|failed\|Error\|passed\|^H\|^NVIDIA\|^cpu\|[0-9]B param" \
    | tail -n "${TAIL:-60}"
}

if [[ $SMOKE == 1 ]]; then
  PHASES="2x1x32"; CONTEXTS="16"; NEW=4; DECODE_CFG="--config tiny --device cpu"
else
  PHASES="200x8x128 100x2x512 40x1x2048"; CONTEXTS="1024 4096"; NEW=48; DECODE_CFG="--device cuda"
fi
STAGES=${STAGES:-fp8_gemm fp8_linear fp8_train mla decode tests}
for stage in $STAGES; do
  case $stage in
    fp8_gemm) step fp8_gemm 90 $PY benchmarks/fp8_gemm.py --tune $SMOKEFLAG ;;
    fp8_linear) step fp8_linear 40 $PY benchmarks/fp8_gemm.py --linear $SMOKEFLAG ;;
    fp8_train) step fp8_train 80 $PY benchmarks/fp8_train_step.py --steps 20 $SMOKEFLAG ;;
    mla) step mla_decode 130 $PY benchmarks/mla_decode.py --sweep --batch 64 8 1 --context 16384 65536 4096 $SMOKEFLAG ;;
    decode)
      step decode 80 $PY benchmarks/decode.py $DECODE_CFG --dtype bfloat16 --no-baselines --phases $PHASES \
        "${WEIGHTS[@]}" --contexts $CONTEXTS --new-tokens $NEW --repeats 2 --draft-tokens 1 2 3 --batch 1
      step decode 45 $PY benchmarks/decode.py $DECODE_CFG --dtype bfloat16 --no-baselines --phases $PHASES \
        "${WEIGHTS[@]}" --contexts $CONTEXTS --new-tokens $NEW --repeats 2 --draft-tokens 1 2 3 --batch 8 ;;
    tests)
      if [[ $SMOKE == 1 ]]; then  # the CPU suite covers the rest; here only that the step itself works
        step tests 120 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_dispatch.py -k "rule or layouts"
      else
        step tests 60 $PY -m pytest -q -rs -p no:cacheprovider tests/kernels/test_fp8_dispatch.py \
          tests/test_mla_decode_kernel.py tests/kernels/test_fp8_gemm.py
      fi ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== all steps: $((SECONDS - START)) s; files in $OUT:"
ls "$OUT"
