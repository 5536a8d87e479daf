#!/usr/bin/env bash
# The whole test suite: installs/builds through setup.sh, then runs every test with CTest
# (GoogleTest suites and the h5py reader test). Tests that need ../shared skip with a reason
# when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd build
ctest --output-on-failure -j"$(nproc)" --timeout 900
