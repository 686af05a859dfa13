#!/usr/bin/env bash
# Builds the extension with ASan+UBSan in a scratch copy and runs the core and stress
# tests on it (Python itself is not instrumented, so the runtime is preloaded and leak
# detection, which would report the interpreter's own allocations, is off).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf build/asan && mkdir -p build/asan
cp -r setup.py pyproject.toml README.md src_cpp tests build/asan/
# the package's sources, without this checkout's build of the extension
tar -c --exclude='*.so' --exclude='_C.cpp' --exclude='__pycache__' mtia_alloc | tar -x -C build/asan
cd build/asan
MTIA_ALLOC_SANITIZE=1 python setup.py build_ext --inplace -q >/dev/null
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
MTIA_STRESS_SECONDS=6 python -m pytest -q -p no:cacheprovider tests/test_stress.py tests/test_size_rounding.py \
    tests/test_splitting_and_merging.py tests/test_block_reuse.py tests/test_max_split_size.py tests/test_oom_and_retry.py \
    tests/test_record_stream.py tests/test_statistics.py tests/test_faults.py tests/test_bad_input.py
