#!/usr/bin/env bash
# Run the test suite with the C core built under AddressSanitizer and
# UndefinedBehaviorSanitizer.
#
#   tools/sanitize.sh [--in-place] [pytest arguments...]
#
# Default: the working tree is copied to a temporary directory, the core is
# built there with UKSM_SANITIZE=address,undefined (csrc/build_native.py),
# and the copy's tests run against that build.  The checkout, its
# uksm/_native*.so and the editable install are never touched, so other
# people's test runs in the same tree are not disturbed and there is nothing
# to rebuild afterwards.
#
# --in-place: what the issue describes, in the checkout itself:
#   UKSM_SANITIZE=address,undefined pip install --no-build-isolation --no-deps -e .
#   run the tests, then `pip install --no-build-isolation --no-deps -e .` again
#   (also on failure or Ctrl-C) to put a normal build back.  While it runs,
#   anyone importing uksm from this checkout without LD_PRELOAD gets
#   "ASan runtime does not come first in initial library list".
#
# How the tests run, and why:
#   LD_PRELOAD=libasan.so libstdc++.so
#       python itself is not built with ASan, so its runtime must be loaded
#       first; libstdc++ too, or ASan cannot find the real __cxa_throw and
#       aborts as soon as a C++ extension throws (matplotlib's ft2font).
#   ASAN_OPTIONS=handle_segv=0:allow_user_segv_handler=1
#       ASan must not take SIGSEGV: uksm's own handler does copy-on-write.
#   detect_leaks=0
#       CPython does not free everything at exit by design.
#   quarantine_size_mb=0:thread_local_quarantine_size_kb=0:allocator_release_to_os_interval_ms=0
#       without these ASan's allocator keeps freed numpy buffers resident and
#       the tests that measure PSS (test_ksm_selftests) see MiBs of noise.
#       The core itself never mallocs (all its memory is mmap'd, which ASan
#       does not track), so no use-after-free detection is lost there.
#   UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=0
#       report every kind of undefined behaviour and carry on; pytest runs
#       with -s so the reports reach the log (they go to stderr: log_path is
#       not honoured with this runtime pair), and the script fails if any
#       "runtime error:" or AddressSanitizer report is in it.
# Override with UKSM_ASAN_OPTIONS / UKSM_UBSAN_OPTIONS.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
in_place=0
if [[ "${1:-}" == "--in-place" ]]; then
    in_place=1
    shift
fi
python="${PYTHON:-python}"
asan_lib="$(gcc -print-file-name=libasan.so)"
stdcxx_lib="$(gcc -print-file-name=libstdc++.so)"
for lib in "$asan_lib" "$stdcxx_lib"; do
    if [[ ! -e "$lib" ]]; then
        echo "sanitize.sh: $lib not found (install gcc with libasan)" >&2
        exit 2
    fi
done
asan_options="${UKSM_ASAN_OPTIONS:-detect_leaks=0:handle_segv=0:allow_user_segv_handler=1:quarantine_size_mb=0:thread_local_quarantine_size_kb=0:allocator_release_to_os_interval_ms=0}"
ubsan_options="${UKSM_UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=0}"
log="$(mktemp /tmp/uksm-sanitize-XXXXXX.log)"

cleanup() { :; }
trap 'cleanup' EXIT

if (( in_place )); then
    cd "$here"
    cleanup() {
        echo "sanitize.sh: rebuilding the normal core (pip install -e .)" >&2
        (cd "$here" && env -u UKSM_SANITIZE "$python" -m pip install -q \
            --no-build-isolation --no-deps -e .) || echo "sanitize.sh: normal rebuild FAILED" >&2
    }
    echo "sanitize.sh: building the sanitized core in place" >&2
    UKSM_SANITIZE=address,undefined "$python" -m pip install -q --no-build-isolation \
        --no-deps -e .
    native="$(ls -t "$here"/uksm/_native*.so | head -1)"
    workdir="$here"
else
    workdir="$(mktemp -d /tmp/uksm-sanitize-XXXXXX)"
    cleanup() { rm -rf "$workdir"; }
    echo "sanitize.sh: copying the working tree to $workdir" >&2
    (cd "$here" && tar --exclude=.git --exclude=build --exclude='*.so' --exclude='*.o' \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=.hypothesis \
        --exclude=.pytest_cache --exclude=.benchmarks --exclude=bench-out \
        --exclude=uksm/_native.c -cf - .) | tar -xf - -C "$workdir"
    echo "sanitize.sh: building the sanitized core" >&2
    (cd "$workdir" && UKSM_SANITIZE=address,undefined "$python" -c '
import sys
sys.path.insert(0, "csrc")
from build_native import ffibuilder
ffibuilder.compile(tmpdir=".", verbose=False)' >/dev/null)
    native="$(ls -t "$workdir"/uksm/_native*.so | head -1)"
fi

deps="$(ldd "$native")"       # (not piped into grep -q: SIGPIPE + pipefail)
if [[ "$deps" != *libasan* || "$deps" != *libubsan* ]]; then
    echo "sanitize.sh: $native is not linked with libasan and libubsan" >&2
    exit 2
fi

cd "$workdir"
echo "sanitize.sh: running the tests (log: $log)" >&2
set +e
LD_PRELOAD="$asan_lib $stdcxx_lib" ASAN_OPTIONS="$asan_options" UBSAN_OPTIONS="$ubsan_options" \
    "$python" -c 'import uksm, sys; sys.stderr.write("sanitize.sh: testing " + uksm.__file__ + "\n")'
LD_PRELOAD="$asan_lib $stdcxx_lib" ASAN_OPTIONS="$asan_options" UBSAN_OPTIONS="$ubsan_options" \
    "$python" -m pytest -s -q -p no:cacheprovider tests "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
pytest_rc=$rc
set -e

reports="$(grep -E 'runtime error:|ERROR: AddressSanitizer|AddressSanitizer: CHECK failed' "$log" \
    | sed -E 's/^.*(csrc\/|uksm\/|ERROR: |AddressSanitizer: CHECK)/\1/; s/0x[0-9a-f]+/0x.../g' \
    | sort | uniq -c || true)"
if [[ -n "$reports" ]]; then
    echo >&2
    echo "sanitize.sh: sanitizer reports (each site once per process):" >&2
    echo "$reports" >&2
    (( rc == 0 )) && rc=1
else
    echo "sanitize.sh: no sanitizer reports" >&2
fi
echo "sanitize.sh: pytest exit status $pytest_rc; log kept in $log" >&2
exit "$rc"
