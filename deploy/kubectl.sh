#!/usr/bin/env bash
# kubectl from PATH, else installed once beside the validation tools (deploy/tools.sh), e.g.
#   deploy/kubectl.sh kustomize deploy/k8s
set -euo pipefail
# shellcheck source=deploy/tools.sh
source "$(dirname "$0")/tools.sh"
kubectl=$(command -v kubectl || echo "$(k8s_tools)/kubectl")
exec "$kubectl" "$@"
