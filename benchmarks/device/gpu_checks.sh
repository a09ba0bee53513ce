#!/usr/bin/env bash
# Run THERE, on the lent GPU machine, from the repository root, as one device call:
#   run(command="bash benchmarks/device/gpu_checks.sh", carry=[".whl", ".data"], timeout_s=560)
# after `bash benchmarks/device/fetch_wheels.sh` here (it also copies Fashion-MNIST's training
# files into .data/). Installs the carried wheels and this checkout (no network, no build
# isolation) into /tmp/site, then writes the GPU figures of issue 11 to $OUT:
# measure_gpu.md (benchmarks/measure_gpu.py: models/s, fraction of the card's bf16 rate,
# sweeps, matching on the device, trained pair included) and device_benchmarks.md (the asv
# suite's cuda variants, benchmarks/device/run_device_benchmarks.py). Extra arguments go to
# measure_gpu.py. RUN chooses the parts (default "measure benchmarks"; also "vmap":
# vmap_or_loop.py, and "profile": profile_torch_gpu.py, the open questions of the 2026-12-04
# run), e.g. RUN="profile vmap" bash benchmarks/device/gpu_checks.sh.
# Locally (a smoke run of the same steps): PYTHON=.venv/bin/python DEVICE=cpu bash
# benchmarks/device/gpu_checks.sh --width 1 --examples 64 --sweep-examples 500 --matching-width 1
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
SITE=${SITE:-/tmp/combinability-site}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and jax share the card in one process
rm -rf "$SITE"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target "$SITE" . \
  || exit 1
export PYTHONPATH="$SITE"
[ -d .data ] && export COMBINABILITY_DATA=$PWD/.data
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" -P -c "import combinability, torch, jax, flax; print('combinability', combinability.__file__); \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| jax', jax.__version__, jax.devices(), \
'| flax', flax.__version__)"
} 2>&1 | tee "$OUT/environment.txt"
RUN=${RUN:-measure benchmarks}
for part in $RUN; do
  case $part in
    measure) timeout ${MEASURE_SECONDS:-380} "$PYTHON" benchmarks/measure_gpu.py --device "$DEVICE" "$@" 2>&1 \
               | tee "$OUT/measure_gpu.md" ;;
    benchmarks) timeout ${BENCH_SECONDS:-120} "$PYTHON" benchmarks/device/run_device_benchmarks.py --device "$DEVICE" \
                  --budget $(( ${BENCH_SECONDS:-120} - 20 )) 2>&1 | tee "$OUT/device_benchmarks.md" ;;
    vmap) timeout ${VMAP_SECONDS:-300} "$PYTHON" benchmarks/device/vmap_or_loop.py --device "$DEVICE" 2>&1 \
            | tee "$OUT/vmap_or_loop.md" ;;
    profile) timeout ${PROFILE_SECONDS:-300} "$PYTHON" benchmarks/device/profile_torch_gpu.py --device "$DEVICE" 2>&1 \
               | tee "$OUT/profile_torch_gpu.md" ;;
    *) echo "unknown part $part; valid: measure benchmarks vmap profile" >&2; exit 2 ;;
  esac
done
echo "written: $(ls "$OUT")"
