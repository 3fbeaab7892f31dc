#!/usr/bin/env bash
# Wheels that the lent GPU machine (Python 3.12; jax, flax, optax, orbax-checkpoint, numpy, pyarrow,
# fsspec, tokenizers already installed, no network) lacks, fetched here into .whl/ (git-ignored) for
# the device tool's `carry`. There, before the benchmark:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.0 tensorboardX==2.6.5
        grain==0.2.18 array-record==0.8.6 portpicker==1.6.0)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${wheels[@]}"
ls -la .whl
