#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace (unit tests
# beside the code, end-to-end tests in tests/ against real openssl, etcd and kubectl).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
cargo build --workspace --all-targets
cargo test --workspace
