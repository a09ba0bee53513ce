#!/usr/bin/env bash
# Run HERE, before a GPU session's device call: download into .whl/ the wheels (CPython 3.12,
# x86-64) of the packages this project needs that the GPU machine's image lacks. That machine
# has torch, jax, flax, optax, numpy, scipy, xarray, matplotlib, numba, pluggy, filelock,
# safetensors, tqdm, scikit-learn, PyYAML, ... but no network: what is missing travels as wheels
# (`carry: [".whl"]`). Versions come from constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for pkg in netCDF4 cftime array-api-compat pooch platformdirs; do
  version=$(grep -i "^${pkg}==" constraints.txt | cut -d= -f3)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${pkg}==${version}"
done
du -sh .whl && ls .whl
# Fashion-MNIST's training files, for the pair gpu_checks.sh trains on the device (carried as .data)
grep -qxF '/.data/' .git/info/exclude || echo '/.data/' >> .git/info/exclude
src=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
mkdir -p .data/fashion_mnist && cp "$src"/train-images-idx3-ubyte.gz "$src"/train-labels-idx1-ubyte.gz .data/fashion_mnist/
du -sh .data
