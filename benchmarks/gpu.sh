#!/usr/bin/env bash
# The GPU work in one place: install carried wheels, run the GPU tests natively, run the benchmarks.
# First, where PyPI is reachable: `bash benchmarks/fetch_gpu_wheels.sh` (fills .whl/). Then from
# the repo root on the GPU machine (device tool: carry [".whl"]):
#     bash benchmarks/gpu.sh              every stage, in order (longer than one 10-minute device call)
#     bash benchmarks/gpu.sh STAGE...     some stages (one or two per device call; none timed on a GPU yet):
#         cat_head  attention  train_tests  train_grid  train_compiled  precompute  vision_mfu  max_batch  whole_runs
#     (TRAIN_GRID_ARGS="--methods dept+coop dept+maple" narrows the grid; RUN_EPOCHS=1 shortens whole_runs)
# Results land in benchmarks/results/ (and in $OUT when the device tool sets it); commit them here.
# A failing stage is reported and the next stages still run; the exit status says if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
ALL_STAGES=(cat_head attention train_tests train_grid train_compiled precompute vision_mfu max_batch whole_runs)
STAGES=("${@:-${ALL_STAGES[@]}}")
status=0
step() { echo; echo "=== $* ==="; }

step "carried wheels (nothing can be fetched there): open_clip_torch, ftfy, wcwidth, xformers, liger-kernel"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

step "fastprompt, editable (kernels/ is mapped to fastprompt.kernels)"
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"

for stage in "${STAGES[@]}"; do
  case "$stage" in
  cat_head)
    step "CAT head kernel tests, natively (fp32/fp16/bf16, gpu-marked large cases)"
    $PY -m pytest tests/kernels/test_cat_head.py -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/cat_head_gpu_tests.log" || status=1
    step "CAT head table: B x C at d=512, bf16, vs eager / torch.compile / Liger"
    $PY benchmarks/cat_head_table.py --out "$RESULTS" || status=1 ;;
  attention)
    step "decoupled attention kernel tests, natively (fp32/fp16/bf16, CLIP shapes, gpu-marked cases)"
    $PY -m pytest tests/kernels/test_decoupled_attention.py tests/kernels/test_attention_module.py tests/kernels/test_openai_clip_dropin.py tests/test_triton_backend.py -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/decoupled_attention_gpu_tests.log" || status=1
    step "decoupled attention table: ViT-B/16 vision + text shapes, bf16, vs eager / flex / SDPA / xformers"
    $PY benchmarks/decoupled_attention_table.py --out "$RESULTS" || status=1 ;;
  # ---- training throughput (issue 6): fastprompt vs the official-style path, same process, same GPU.
  train_tests)
    step "training fast paths: exactness tests and the bench smoke mode"
    $PY -m pytest tests/test_fast_paths.py tests/test_bench.py -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/train_fast_paths_tests.log" || status=1 ;;
  train_grid)
    step "train bench: 10 methods x batch 4/32/128 x classes 50/500/1000, fast vs official, ViT-B/16 random weights, bf16"
    $PY -m fastprompt bench train --out "$RESULTS" ${TRAIN_GRID_ARGS:-} || status=1 ;;
  train_compiled)
    step "train bench, fast path compiled (dynamic class count) + CUDA graphs"
    $PY -m fastprompt bench train --out "$RESULTS" --styles fast --compile --cuda-graphs ${TRAIN_GRID_ARGS:-} || status=1 ;;
  precompute)
    step "image features encoded ahead vs in each step (the measurement behind train.precompute_features' default)"
    $PY -m fastprompt bench train --out "$RESULTS" --no-steps --precompute coop dept+coop --batches 4 32 128 --classes 50 1000 || status=1 ;;
  vision_mfu)
    step "prompted image encoder alone (MaPLe, DPL): forward + backward at batch 128, MFU"
    $PY -m fastprompt bench train --out "$RESULTS" --no-steps --batches 128 --vision-mfu maple dpl dept+maple || status=1 ;;
  max_batch)
    step "largest batch that fits on this GPU at 1000 classes (ImageNet), both styles"
    $PY -m fastprompt bench train --out "$RESULTS" --no-steps --classes 1000 --max-batch coop dept+coop maple dept+maple || status=1 ;;
  whole_runs)
    # The paper's 10 epochs take far longer than one device call: RUN_EPOCHS=1 fits one.
    step "whole base-to-new runs: 500 base classes x 16 shots, batch 4, ${RUN_EPOCHS:-10} epochs, 50 test images per class"
    $PY -m fastprompt bench train --out "$RESULTS" --no-steps --run dept+coop dept+maple --run-epochs "${RUN_EPOCHS:-10}" || status=1 ;;
  *)
    echo "unknown stage '$stage'; stages: ${ALL_STAGES[*]}" >&2; exit 2 ;;
  esac
done

if [ -n "${OUT:-}" ]; then cp -r "$RESULTS"/. "$OUT"/; fi
exit $status
