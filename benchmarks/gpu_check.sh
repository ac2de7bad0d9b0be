#!/usr/bin/env bash
# Issue 8's GPU checks in one run on a one-GPU machine (H100/H200), at most 9.5 minutes (BUDGET_S): the throughput
# targets first, then the CUDA-only tests, then torch.compile. Each stage has its own time limit, so a slow
# stage still leaves the others' results (the benchmark writes its JSON after every row).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # from the repository root; OUT_DIR defaults to $OUT
#
# It uses the machine's own python3 with its torch and lightning (a GPU box may have no network) and
# installs lit_robust itself without dependencies into a private folder. Results: JSON per stage, the
# pytest log and versions.txt in OUT_DIR; copy the JSON to benchmarks/results/ and the numbers to
# RESULTS.md. The two-GPU SyncBatchNorm test (tests/test_ddp.py) needs a machine with two GPUs.
# The mechanics can be checked without a GPU (every stage then fails or skips quickly, or times out):
#   PYTHON=.venv/bin/python DEVICE=cpu BATCH=2 bash benchmarks/gpu_check.sh /tmp/gpu_check
set -u
out=${1:-${OUT:?give OUT_DIR or set OUT}}
py=${PYTHON:-python3}
site=${LIT_ROBUST_SITE:-/tmp/lit_robust_site}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# -P: the checkout's own lit_robust/ (without datamodules/ and callbacks/) must not shadow the installed one
run() { echo "== $*"; timeout "$@"; echo "== exit $?"; }

"$py" -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" --upgrade . || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -P -c "import torch, lightning, torchmetrics, lit_robust.defenses as d; print('torch', torch.__version__,
'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$out/versions.txt"

bench=("$py" -P benchmarks/throughput.py --device "${DEVICE:-cuda}" --batch-size "${BATCH:-512}" --channels-last)
# 1. the targets: PGD-10 / FGSM-RS / TRADES-10, bf16, batch 512 (PreActResNet-18 <= 8 s / 2 s per epoch,
#    WRN-34-10 PGD-10 <= 60 s; library within 3% of the plain loop)
run 150 "${bench[@]}" --models preactresnet18 --steps 20 --warmup 5 --repeats 3 --out "$out/gpu_preactresnet18.json"
run 150 "${bench[@]}" --models wrn-34-10 --steps 6 --warmup 2 --repeats 2 --out "$out/gpu_wrn34.json"
# 2. the CUDA cases of the test suite: bf16 for every defense, torch's sync detector inside every training
#    step and whole batch (callbacks included), inductor with input gradients, on-device data, smoothing
#    counts on the device
run 180 "$py" -P -m pytest -q -p no:cacheprovider tests/test_fast_path.py tests/test_host_sync.py \
    tests/test_arrays.py tests/test_randomized_smoothing.py tests/test_ddp.py -k "cuda or inductor or sync_batchnorm" -rs 2>&1 \
    | tee "$out/pytest_cuda.log"
# 3. torch.compile (inductor) on the smaller network, in the time left (compiling takes a minute or more)
left=$((${BUDGET_S:-570} - SECONDS))
if [ "$left" -gt 60 ]; then
    run "$left" "${bench[@]}" --models preactresnet18 --defenses pgdat fastat --steps 20 --warmup 5 --repeats 1 \
        --compile --out "$out/gpu_preactresnet18_compiled.json"
else
    echo "== no time left for the torch.compile stage ($left s)"
fi
