#!/usr/bin/env bash
# Issue #4's GPU checks in one run on a lent GPU machine (prepare with scripts/device_prepare.sh):
# the tests marked `gpu`, then scripts/benchmark.py on 720p video with deeplabv3_resnet101 at
# the default CUDA precision (fp16): (a), (b), (c), --stride 2 4, live ages, and fp16 against
# fp32. Everything lands in $OUT (the device tool brings it back). About 5 minutes on an H200.
# Environment: DEVICE (cuda), MODEL (deeplabv3_resnet101), FRAMES (300), REPEAT (2), VIDEO.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/streamseg-gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/streamseg-site .whl/*.whl \
    || { echo "gpu_check: cannot install the carried wheels" >&2; exit 1; }
  export PYTHONPATH=/tmp/streamseg-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
device=${DEVICE:-cuda}
model=${MODEL:-deeplabv3_resnet101}
video=${VIDEO:-.devmedia/highway_2cars_720p.mp4}
[ -f "$video" ] || video=../shared/media/highway_2cars_720p.mp4
status=0
{
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  nproc
  python3 -c 'import sys, torch, torchvision, cv2, av, numpy, onnxruntime
print(sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "opencv", cv2.__version__,
      "av", av.__version__, "numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
} 2>&1 | tee "$OUT/environment.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_model.py 2>&1 | tee "$OUT/pytest_gpu.txt" || status=1
timeout 420 python3 scripts/benchmark.py "$video" --model "$model" --device "$device" --frames "${FRAMES:-300}" \
  --repeat "${REPEAT:-2}" --stride 2 4 --live --compare-precision --json "$OUT/benchmark_${model}.json" 2>&1 \
  | tee "$OUT/benchmark_${model}.txt" || status=1
exit $status
