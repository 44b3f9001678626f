#!/usr/bin/env bash
# k8s-dev-secrets.sh - the files the dev overlay makes its Secrets from, in
# k8s/overlays/dev/secrets/ (git-ignored): a dev CA (ca.crt; ca.key stays here), the gateway's
# certificate and key (tls.crt, tls.key) and the master key (master.key, 64 hex digits, the
# format of `cloud-gateway admin gen-master-key`). Files that exist are kept; delete them to
# reissue. The certificate names the in-cluster Service and, when set, WRITEBACK_AGENT_HOST
# (the agents' LoadBalancer address: a DNS name or an IP), e.g.
#   WRITEBACK_AGENT_HOST=writeback.dev.example.com scripts/k8s-dev-secrets.sh
# Agents are given ca.crt as --gateway-ca. Not for production (k8s/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
D=k8s/overlays/dev/secrets
NS=writeback   # the namespace of the overlays
mkdir -p "$D"
umask 077

if [ ! -s "$D/ca.crt" ] || [ ! -s "$D/ca.key" ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=writeback dev CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$D/ca.key" -out "$D/ca.crt" 2>/dev/null
  rm -f "$D/tls.crt" "$D/tls.key"   # a new CA: reissue the certificate too
  echo "made $D/ca.crt (give it to the agents as --gateway-ca)"
fi
if [ ! -s "$D/tls.crt" ] || [ ! -s "$D/tls.key" ]; then
  san="DNS:cloud-gateway,DNS:cloud-gateway.$NS,DNS:cloud-gateway.$NS.svc"
  san="$san,DNS:cloud-gateway.$NS.svc.cluster.local,DNS:localhost,IP:127.0.0.1"
  host=${WRITEBACK_AGENT_HOST:-}
  if [[ $host =~ ^[0-9.]+$ ]]; then san="$san,IP:$host"; elif [ -n "$host" ]; then san="$san,DNS:$host"; fi
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  openssl req -newkey rsa:2048 -nodes -subj "/CN=cloud-gateway.$NS.svc" \
    -keyout "$D/tls.key" -out "$tmp/gw.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$san" \
    >"$tmp/ext.cnf"
  openssl x509 -req -in "$tmp/gw.csr" -CA "$D/ca.crt" -CAkey "$D/ca.key" -CAcreateserial \
    -CAserial "$tmp/ca.srl" -days 825 -extfile "$tmp/ext.cnf" -out "$D/tls.crt" 2>/dev/null
  echo "made $D/tls.crt for $san"
fi
if [ ! -s "$D/master.key" ]; then
  openssl rand -hex 32 >"$D/master.key"
  echo "made $D/master.key (losing it loses every tenant's keys: back it up)"
fi
