#!/usr/bin/env bash
# CUDA checks on a GPU machine with torch already installed (no ROS needed): the CUDA variants
# of the tests, the certification CLI on CUDA against the CPU, and the certification benchmark.
#   bash scripts/gpu_check.sh [runs/demo] [log dir]
# The demo model and data (make demo) must be under the first argument.
set -u -o pipefail
DEMO=${1:-runs/demo}
LOG=${2:-/tmp/usn_gpu_check}
mkdir -p "$LOG"
export PYTHONPATH=$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() { echo; echo "== $*"; }

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, onnxruntime as ort; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
'| onnxruntime', ort.__version__, ort.get_available_providers())"
$PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>&1 | tail -1

step "tests: CUDA variants and the certify CLI (device auto = CUDA)"
timeout 240 $PY -m pytest -q -p no:cacheprovider -rs -k "cuda or certify_cli" \
    tests/test_certify_soundness.py tests/test_certify_search.py tests/test_export_bundle.py \
    tests/test_train.py tests/test_prune_cli.py tests/test_certify_cli.py tests/test_tensorrt_engine.py 2>&1 | tail -15

for dev in cuda cpu; do
    step "certify CLI on $dev: 10 images, ±5 % box, eps 0.01 0.02 0.04"
    timeout 150 $PY -m usn_offline.cli certify --checkpoint "$DEMO/pruned.pt" --data "$DEMO/data" \
        --num-images 10 --delta 2 --contrast 0.95 1.05 --brightness -0.05 0.05 --eps 0.01 0.02 0.04 \
        --device $dev --quiet --out "$LOG/cert_$dev.json" 2>&1 | tail -12
done
step "CPU and CUDA certificates agree"
$PY - "$LOG" <<'PYEOF'
import json, sys
import numpy as np
c, g = (json.load(open(f"{sys.argv[1]}/cert_{d}.json")) for d in ("cpu", "cuda"))
for key in ("reference_px", "lower_px", "upper_px"):
    diff = max(np.abs(np.array(a[key]) - np.array(b[key])).max() for a, b in zip(c["images"], g["images"]))
    print(f"{key}: max |cpu - cuda| = {diff:.3e} px")
print("status equal:", [a["status"] for a in c["images"]] == [b["status"] for b in g["images"]])
print("certified at eps equal:", [a["certified_at_eps"] for a in c["images"]] ==
      [b["certified_at_eps"] for b in g["images"]])
for d, doc in (("cpu", c), ("cuda", g)):
    print(d, "seconds/image:", np.round([i["seconds"] for i in doc["images"]], 3).tolist())
PYEOF

step "benchmark on CUDA"
timeout 200 $PY bench/certify_bench.py --checkpoint "$DEMO/pruned.pt" --data "$DEMO/data" --device cuda \
    --images 10 --radius-images 10 --radius-boxes 128 256 512 2>&1
