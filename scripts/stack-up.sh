#!/usr/bin/env bash
# stack-up.sh (make up) - the local stack as production runs it: Redis, a Samba AD forest on
# 127.0.0.2, two gateway replicas, two agents; then one demo reset end to end.
# Idempotent: restarts only what is not running; keys, tokens and the forest are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
S=$ROOT/target/stack
PIDS=$S/pids LOGS=$S/logs SECRETS=$S/secrets
REALM=CORP.WRITEBACK.TEST FOREST=corp.writeback.test DC_IP=127.0.0.2
REDIS_PORT=6390 GW_A=127.0.0.1:7443 GW_B=127.0.0.1:7444 TENANT=demo
BIN=$ROOT/target/debug
mkdir -p "$PIDS" "$LOGS" "$SECRETS"; chmod 700 "$SECRETS"

step() { printf '==> %s\n' "$*"; }
alive() { local f=$PIDS/$1.pid; [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }
fail() { echo "error: $1" >&2; [ -n "${2:-}" ] && [ -f "$LOGS/$2.log" ] && tail -20 "$LOGS/$2.log" >&2; exit 1; }
wait_port() { # host port name
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0; alive "$3" || fail "$3 exited" "$3"; sleep 0.1; done
  fail "$3 is not listening on $1:$2" "$3"
}

step "dependencies"
scripts/install-deps.sh

step "build"
cargo build --workspace --bins --quiet

step "tls and keys"
if [ ! -f "$S/tls/gateway.pem" ]; then
  mkdir -p "$S/tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=writeback demo CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$S/tls/ca.key" -out "$S/tls/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$S/tls/gateway.key" -out "$S/tls/gateway.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > "$S/tls/ext.cnf"
  openssl x509 -req -in "$S/tls/gateway.csr" -CA "$S/tls/ca.pem" -CAkey "$S/tls/ca.key" -CAcreateserial \
    -days 3650 -extfile "$S/tls/ext.cnf" -out "$S/tls/gateway.pem" 2>/dev/null
  chmod 600 "$S/tls/ca.key" "$S/tls/gateway.key"
fi
[ -f "$SECRETS/master.key" ] || (umask 077; "$BIN/cloud-gateway" admin gen-master-key > "$SECRETS/master.key")

step "redis on 127.0.0.1:$REDIS_PORT"
if ! alive redis; then
  mkdir -p "$S/redis"
  setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$S/redis" --save 60 1 --appendonly no \
    >"$LOGS/redis.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/redis.pid"
fi
wait_port 127.0.0.1 "$REDIS_PORT" redis
REDIS_URL=redis://127.0.0.1:$REDIS_PORT

step "samba AD DC $REALM on $DC_IP"
scripts/ad-dc.sh "$S/samba" "$REALM" "$DC_IP" | tail -1
cp "$S/samba/run/samba.pid" "$PIDS/samba.pid"
. "$S/samba/env"
printf '%s' 'Svc#Writeback1' > "$SECRETS/svc.password"; chmod 600 "$SECRETS/svc.password"

step "tenant $TENANT and agent credentials"
admin() { "$BIN/cloud-gateway" admin "$1" --redis-url "$REDIS_URL" --master-key-file "$SECRETS/master.key" "${@:2}"; }
token=$(admin create-tenant --tenant "$TENANT" --if-missing)
if [ -n "$token" ]; then (umask 077; printf '%s\n' "$token" > "$SECRETS/tenant.token"); fi
[ -s "$SECRETS/tenant.token" ] || { (umask 077; admin create-tenant --tenant "$TENANT" > "$SECRETS/tenant.token"); }
for a in agent-1 agent-2; do
  if ! alive "$a" || [ ! -s "$SECRETS/$a.secret" ]; then
    (umask 077; admin register-agent --tenant "$TENANT" --forest "$FOREST" --agent-id "$a" > "$SECRETS/$a.secret")
  fi
done

start_gateway() { # name addr metrics-addr
  alive "$1" && return 0
  WRITEBACK_REPLICA_ID=$1 OTEL_SERVICE_NAME=${OTEL_SERVICE_NAME:-cloud-gateway} \
  setsid "$BIN/cloud-gateway" serve --listen "$2" --tls-cert "$S/tls/gateway.pem" --tls-key "$S/tls/gateway.key" \
    --redis-url "$REDIS_URL" --master-key-file "$SECRETS/master.key" --replica-id "$1" --metrics-listen "$3" \
    >"$LOGS/$1.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$1.pid"
}
start_agent() { # name gateway-addr metrics-addr (loopback)
  alive "$1" && return 0
  OTEL_SERVICE_NAME=${OTEL_SERVICE_NAME:-onprem-agent} \
  setsid "$BIN/onprem-agent" run --gateway-url "https://$2" --gateway-ca "$S/tls/ca.pem" \
    --agent-id "$1" --agent-secret-file "$SECRETS/$1.secret" --forest "$FOREST" \
    --ldap-url "$DC_LDAPS_URL" --ldap-ca "$DC_CA" --bind-dn "$DC_SVC_UPN" \
    --bind-password-file "$SECRETS/svc.password" --base-dn "$DC_BASE_DN" --metrics-listen "$3" \
    >"$LOGS/$1.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$1.pid"
}

step "gateways gateway-a ($GW_A), gateway-b ($GW_B)"
start_gateway gateway-a "$GW_A" 127.0.0.1:9101; start_gateway gateway-b "$GW_B" 127.0.0.1:9102
wait_port 127.0.0.1 "${GW_A##*:}" gateway-a; wait_port 127.0.0.1 "${GW_B##*:}" gateway-b

step "agents agent-1 -> gateway-a, agent-2 -> gateway-b"
start_agent agent-1 "$GW_A" 127.0.0.1:9201; start_agent agent-2 "$GW_B" 127.0.0.1:9202
for a in agent-1 agent-2; do
  for _ in $(seq 100); do grep -q "connected to gateway" "$LOGS/$a.log" && break; alive "$a" || fail "$a exited" "$a"; sleep 0.1; done
  grep -q "connected to gateway" "$LOGS/$a.log" || fail "$a did not connect" "$a"
done

cat > "$S/stack.env" <<ENV
WRITEBACK_ADDR=$GW_A
WRITEBACK_ADDRS=$GW_A,$GW_B
WRITEBACK_CA=$S/tls/ca.pem
WRITEBACK_TENANT=$TENANT
WRITEBACK_TOKEN=$(cat "$SECRETS/tenant.token")
WRITEBACK_FOREST=$FOREST
REDIS_URL=$REDIS_URL
AD_LDAP_URL=$DC_LDAPS_URL
AD_CA=$DC_CA
AD_BASE_DN=$DC_BASE_DN
AD_REALM=$REALM
AD_ADMIN_DN=CN=Administrator,CN=Users,$DC_BASE_DN
AD_ADMIN_PASSWORD=Adm1n!Passw0rd
KRB5_CONFIG=$KRB5_CONFIG
GATEWAY_METRICS=http://127.0.0.1:9101/metrics,http://127.0.0.1:9102/metrics
AGENT_METRICS=http://127.0.0.1:9201/metrics,http://127.0.0.1:9202/metrics
ENV
chmod 600 "$S/stack.env"

step "demo: reset alice's password through gateway-a (agents on both replicas)"
pwfile=$(mktemp); chmod 600 "$pwfile"; trap 'rm -f "$pwfile"' EXIT
printf 'Demo-%s#1a' "$(openssl rand -hex 6)" > "$pwfile"
set +e
WRITEBACK_TOKEN=$(cat "$SECRETS/tenant.token") "$BIN/relayctl" --addr "$GW_A" --ca "$S/tls/ca.pem" --tenant "$TENANT" \
  submit --forest "$FOREST" --user alice --reset --password-stdin < "$pwfile"
rc=$?
set -e
[ $rc -eq 0 ] || fail "demo reset was not applied (relayctl exit $rc)" gateway-a
if LDAPTLS_CACERT=$DC_CA ldapsearch -LLL -x -o nettimeout=5 -H "$DC_LDAPS_URL" -D "alice@$FOREST" -y "$pwfile" -s base -b "" dn >/dev/null 2>&1; then
  echo "verified: alice can bind to $DC_LDAPS_URL with the new password"
else
  fail "alice cannot bind with the new password"
fi
echo
echo "stack is up: . target/stack/stack.env; logs in target/stack/logs; make down to stop"
