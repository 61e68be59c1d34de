#!/bin/bash
# Every check that needs a GPU, as one prepared run for the device machine (see README "GPU checks"):
# the CUDA tests (`pytest -m cuda`) and bench/gpu.py, each under its own time limit; logs and JSON go to $OUT.
#
#   run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
#
# The device's Python has torch with CUDA, transformers and peft but no diffusers: the wheels in .whl/ (downloaded
# here, see README) are installed into /tmp/site first. BENCH_ARGS adds flags to bench/gpu.py (e.g. --no-compile).
set -o pipefail
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, diffusers; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)") 2>&1 | tee "$OUT/machine.txt"
timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-cuda.log"
echo "pytest -m cuda: exit $?" | tee -a "$OUT/machine.txt"
timeout 300 python3 bench/gpu.py --json "$OUT/gpu.json" $BENCH_ARGS 2>&1 | tee "$OUT/bench-gpu.log"
echo "bench/gpu.py: exit $?" | tee -a "$OUT/machine.txt"
