#!/usr/bin/env bash
# Run on a machine with PyPI access, before a GPU check: downloads tools/gpu/requirements.txt and every dependency
# as Python 3.12 x86_64 manylinux wheels into tools/gpu/wheels/ (git-ignored), which gpu_check.sh installs from
# with --no-index. Then carry it: the device tool's `carry: ["tools/gpu/wheels"]`.
set -euo pipefail
cd "$(dirname "$0")"
PIP=${PIP:-pip}
mkdir -p wheels
"$PIP" download --dest wheels --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -r requirements.txt
du -sh wheels
ls wheels
