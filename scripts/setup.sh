#!/usr/bin/env bash
# Installs every Debian 12 package quantlab needs (only those missing), then configures and
# builds it in ./build with plain CMake. Safe to run again: it only does what is left.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(g++ cmake make pkg-config
      libeigen3-dev libopenblas-openmp-dev liblapacke-dev
      libhdf5-dev libyaml-cpp-dev libboost-program-options-dev
      libgtest-dev libbenchmark-dev librandom123-dev
      nlohmann-json3-dev libsentencepiece-dev libpcre2-dev libutf8proc-dev
      python3 python3-numpy python3-h5py python3-pandas python3-matplotlib)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
