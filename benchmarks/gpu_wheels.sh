#!/usr/bin/env bash
# Fetch, on a machine with pip access, the wheels that darec needs and the lent GPU machine lacks
# (its python3 3.12 has torch, numpy, scikit-learn, matplotlib, tqdm, pyyaml, scipy, onnx*, httpx, but
# not polars or pydantic; it cannot download). Writes .whl/ (ignored by git, ~55 MB); carry it with the
# device tool and run benchmarks/gpu_suite.sh there, which installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl polars polars-runtime-32 pydantic pydantic-core annotated-types typing-inspection \
    fastapi starlette uvicorn h11 click
ls .whl
