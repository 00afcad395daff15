#!/usr/bin/env bash
# Fill bench/wheels/ with what bench/gpu.sh installs on a GPU machine that has no network and
# only torch, transformers, peft and accelerate: trl, datasets and the dependencies of theirs
# such a machine lacks. pyarrow's wheel (55 MB) is slimmed to what datasets uses (no Flight,
# S3, headers, Cython sources or C++ tests), so the folder stays under the 64 MiB a device run
# can carry. pandas 2.2 (not 3) because it runs on numpy 1.x as well as 2.x. Wheels are for
# this machine's Python (cp311). bench/wheels-gpu/ gets the same for the device tool's GPU
# machines (Python 3.12, no pydantic, trl or datasets; pyarrow, pandas and xxhash present):
# gpu.sh takes the folder whose wheels fit the Python it runs.
#   bash bench/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHEELS=bench/wheels
mkdir -p "$WHEELS"
"$PY" -m pip download --no-deps -q -d "$WHEELS" \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
  pyarrow==26.0.1 pandas==2.2.3 pytz==2026.6 python-dateutil==4.0.0 tzdata==2026.6
"$PY" bench/slim_wheel.py "$WHEELS"/pyarrow-26.0.1-*.whl \
  'pyarrow/libarrow_flight.so*' 'pyarrow/_flight.*' 'pyarrow/libarrow_python_flight.so*' \
  'pyarrow/libarrow_s3.so*' 'pyarrow/_s3fs.*' 'pyarrow/include/*' 'pyarrow/src/*' 'pyarrow/tests/*' \
  'pyarrow/_pyarrow_cpp_tests.*' 'pyarrow/*.pxd' 'pyarrow/*.pyx' 'pyarrow/*.pxi' 'pyarrow/includes/*'
du -sh "$WHEELS"
GPU_WHEELS=bench/wheels-gpu
mkdir -p "$GPU_WHEELS"
"$PY" -m pip download --no-deps -q -d "$GPU_WHEELS" --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0  # for tests/gpu
du -sh "$GPU_WHEELS"
