#!/usr/bin/env bash
# Builds the extension with ASan+UBSan in a scratch copy and runs the core and stress
# tests on it (Python itself is not instrumented, so the runtime is preloaded and leak
# detection, which would report the interpreter's own allocations, is off).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf build/asan && mkdir -p build/asan
cp -r setup.py pyproject.toml README.md src_cpp tests build/asan/
mkdir build/asan/mtia_alloc && cp mtia_alloc/*.py mtia_alloc/*.pyx mtia_alloc/*.pxd mtia_alloc/*.pxi mtia_alloc/*.h build/asan/mtia_alloc/
cp -r mtia_alloc/_core build/asan/mtia_alloc/
cd build/asan
MTIA_ALLOC_SANITIZE=1 python setup.py build_ext --inplace -q >/dev/null
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
MTIA_STRESS_SECONDS=6 python -m pytest -q -p no:cacheprovider tests/test_stress.py tests/test_allocator_core.py \
    tests/test_faults.py tests/test_bad_input.py
