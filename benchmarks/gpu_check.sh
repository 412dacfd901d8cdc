#!/usr/bin/env bash
# The GPU checks, in one go: run from the repository root with `bash benchmarks/gpu_check.sh`.
# Needs torch, numpy, pandas, pyarrow, torchmetrics, pyyaml, scikit-learn and pydantic (not
# prefect or mlflow). Wheels in .whl/ are installed to /tmp/site first. MNIST_ROOT names the
# folder with the t10k files (default ../shared/data/mnist). JSON lines go to stdout and,
# when $OUT is set, to $OUT/bench.jsonl. Expected about 7 minutes; the per-step caps add up to 11.7.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ -z "${MNIST_ROOT:-}" ]; then
  if [ -d .gpu-data/mnist ]; then MNIST_ROOT=.gpu-data/mnist; else MNIST_ROOT=../shared/data/mnist; fi
fi
JSONL=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; JSONL="$OUT/bench.jsonl"; : > "$JSONL"; fi
PY=python3
step() { echo "== $* ($(date +%T))" >&2; }

step versions
nvidia-smi || echo "nvidia-smi not available"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"

step "tests on CUDA (train, models, fast path, CUDA graph step)"
timeout 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_fastpath.py tests/test_graphstep.py tests/test_train.py \
  tests/test_models.py 2>&1 | tail -15

step "DDP on CUDA: world size 1 through the elastic launcher with NCCL against the plain path"
timeout 60 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_distributed.py -k nccl 2>&1 | tail -5
timeout 60 $PY benchmarks/ddp_scaling.py --quick | tee -a "$JSONL"

step train_throughput
timeout 130 $PY benchmarks/train_throughput.py --n 60000 --no-compile | tee -a "$JSONL"

step mnist_fast
timeout 45 $PY benchmarks/mnist_fast.py --mnist-root "$MNIST_ROOT" --seeds 3 | tee -a "$JSONL"
# variants, for choosing the preset's settings on the GPU: the whole step as one CUDA graph (needs a fixed beta1)
timeout 45 $PY benchmarks/mnist_fast.py --mnist-root "$MNIST_ROOT" --seeds 3 --name mnist_fast.graph --no-baseline \
  --set train.cuda_graph=true --set schedule.cycle_momentum=false | tee -a "$JSONL"
timeout 30 $PY benchmarks/mnist_fast.py --mnist-root "$MNIST_ROOT" --seeds 3 --name mnist_fast.graph_e10_b512 --no-baseline \
  --set train.cuda_graph=true --set schedule.cycle_momentum=false --set train.epochs=10 --set train.batch_size=512 \
  | tee -a "$JSONL"
timeout 75 $PY benchmarks/mnist_fast.py --mnist-root "$MNIST_ROOT" --seeds 3 --name mnist_fast.compiled --no-baseline \
  --set train.compile=true --set train.compile_mode=reduce-overhead | tee -a "$JSONL"
# half the steps: on the 2-core CPU, 10 epochs at batch 512 gave 99.30% and 8 epochs at lr 0.015 99.20% (3 seeds)
timeout 30 $PY benchmarks/mnist_fast.py --mnist-root "$MNIST_ROOT" --seeds 3 --name mnist_fast.e10_b512 --no-baseline \
  --set train.epochs=10 --set train.batch_size=512 | tee -a "$JSONL"
timeout 30 $PY benchmarks/mnist_fast.py --mnist-root "$MNIST_ROOT" --seeds 3 --name mnist_fast.e8_b512 --no-baseline \
  --set train.batch_size=512 --set optim.lr=0.015 --set schedule.max_lr=0.015 | tee -a "$JSONL"

step "csv_ingest --quick"
timeout 45 $PY benchmarks/csv_ingest.py --quick | tee -a "$JSONL"
step done
