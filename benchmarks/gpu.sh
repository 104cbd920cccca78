#!/usr/bin/env bash
# The one command for whoever has a GPU: install carried wheels, run the GPU tests natively, run the
# table scripts. First, where PyPI is reachable: `bash benchmarks/fetch_gpu_wheels.sh` (fills .whl/).
# Then from the repo root on the GPU machine (device tool: carry [".whl"]):
#     bash benchmarks/gpu.sh
# Results land in benchmarks/results/ (and in $OUT when the device tool sets it); commit them here.
# Each step says what it is; a failing test step is reported and the benchmarks still run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RESULTS=benchmarks/results
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ==="; }

step "carried wheels (nothing can be fetched there): open_clip_torch, ftfy, wcwidth, liger-kernel"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

step "fastprompt, editable (kernels/ is mapped to fastprompt.kernels)"
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"

step "CAT head kernel tests, natively (fp32/fp16/bf16, gpu-marked large cases)"
$PY -m pytest tests/kernels/test_cat_head.py -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/cat_head_gpu_tests.log" || status=1

step "CAT head table: B x C at d=512, bf16, vs eager / torch.compile / Liger"
$PY benchmarks/cat_head_table.py --out "$RESULTS" || status=1

step "decoupled attention kernel tests, natively (fp32/fp16/bf16, CLIP shapes, gpu-marked cases)"
$PY -m pytest tests/kernels/test_decoupled_attention.py tests/kernels/test_attention_module.py -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/decoupled_attention_gpu_tests.log" || status=1

step "decoupled attention table: ViT-B/16 vision + text shapes, bf16, vs eager / flex / SDPA / xformers"
$PY benchmarks/attention_table.py --out "$RESULTS" || status=1

# ---- training throughput (issue 6): fastprompt vs the official-style path, same process, same GPU.
# Each step below is also one command on its own. Whole runs default to the paper's 10 epochs
# (about half an hour for both methods and styles); RUN_EPOCHS=1 fits a 10-minute device call.
step "training fast paths: exactness tests (CPU tiny model) and the bench smoke mode"
$PY -m pytest tests/test_fast_paths.py tests/test_bench.py -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/train_fast_paths_tests.log" || status=1

step "train bench: 10 methods x batch 4/32/128 x classes 50/500/1000, fast vs official, ViT-B/16 random weights, bf16"
$PY -m fastprompt bench train --out "$RESULTS" || status=1

step "train bench, fast path compiled (dynamic class count) + CUDA graphs"
$PY -m fastprompt bench train --out "$RESULTS" --styles fast --compile --cuda-graphs || status=1

step "prompted image encoder alone (MaPLe, DPL): forward + backward at batch 128, MFU"
$PY -m fastprompt bench train --out "$RESULTS" --no-steps --batches 128 --vision-mfu maple dpl dept+maple || status=1

step "largest batch that fits on this GPU at 1000 classes (ImageNet), both styles"
$PY -m fastprompt bench train --out "$RESULTS" --no-steps --classes 1000 --max-batch coop dept+coop maple dept+maple || status=1

step "whole base-to-new runs: 500 base classes x 16 shots, batch 4, ${RUN_EPOCHS:-10} epochs, 50 test images per class"
$PY -m fastprompt bench train --out "$RESULTS" --no-steps --run dept+coop dept+maple --run-epochs "${RUN_EPOCHS:-10}" || status=1

if [ -n "${OUT:-}" ]; then cp -r "$RESULTS"/. "$OUT"/; fi
exit $status
