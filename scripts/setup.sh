#!/usr/bin/env bash
# Installs what tidemark's build and tests need and a fresh Debian machine
# lacks. Sourced by the quick-start scripts; safe to run again (it installs
# only what is missing).
set -euo pipefail

# Debian packages: libclang-dev (bindgen for RocksDB), protobuf-compiler
# (tonic), and the tools the tests and benches drive (etcd-server: the
# failover witness the tests start on their own ports; python3-venv: the
# virtual environment for moto, below; chromium and chromium-driver: the
# console's browser tests).
TIDEMARK_PACKAGES=(libclang-dev protobuf-compiler fio libnbd-bin nbdkit e2fsprogs qemu-utils util-linux mount python3 python3-venv openssl curl etcd-server chromium chromium-driver)

missing=()
for pkg in "${TIDEMARK_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# moto, the S3-compatible server the end-to-end tests start on their own
# ports, pinned, in its own virtual environment (Debian's python3 refuses
# pip installs into the system). The tests find it through
# TIDEMARK_MOTO_SERVER.
TIDEMARK_MOTO_VERSION=5.2.5
moto_venv="${XDG_CACHE_HOME:-$HOME/.cache}/tidemark-tools/moto-venv"
moto_ready() {
  "$moto_venv/bin/python" -c "import sys, moto, moto.server; sys.exit(moto.__version__ != '$TIDEMARK_MOTO_VERSION')" 2>/dev/null
}
if ! moto_ready; then
  echo "setup: installing moto[server]==$TIDEMARK_MOTO_VERSION in $moto_venv"
  if ! "$moto_venv/bin/python" -m pip --version >/dev/null 2>&1; then
    mkdir -p "$(dirname "$moto_venv")"
    # Debian's python3 (the package above, which python3-venv serves).
    "$(command -v /usr/bin/python3 || command -v python3)" -m venv --clear "$moto_venv"
  fi
  "$moto_venv/bin/python" -m pip install -q --disable-pip-version-check "moto[server]==$TIDEMARK_MOTO_VERSION"
  moto_ready || { echo "setup: moto $TIDEMARK_MOTO_VERSION did not install in $moto_venv" >&2; exit 1; }
fi
export TIDEMARK_MOTO_SERVER="$moto_venv/bin/moto_server"

command -v cargo >/dev/null || { echo "setup: no Rust toolchain (cargo) on PATH; install one with rustup" >&2; exit 1; }
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    command -v rustup >/dev/null && rustup component add "$component" || { echo "setup: cargo $component is missing" >&2; exit 1; }
  fi
done

# One target directory outside every checkout, so a fresh clone (CI) reuses
# the RocksDB build instead of spending ten minutes on it again.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="$HOME/.cache/tidemark-target"
  mkdir -p "$CARGO_TARGET_DIR"
fi
