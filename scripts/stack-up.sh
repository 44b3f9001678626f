#!/usr/bin/env bash
# stack-up.sh (make up) - the local stack as production runs it: Redis, a Samba AD forest on
# 127.0.0.2, two gateway replicas, two agents; then one demo reset end to end.
# Idempotent: restarts only what is not running; the master key, the tenant token and the forest
# are kept (agent secrets are re-issued whenever that agent is (re)started).
# Standard OTEL_* variables are passed through to the gateways and agents; OTEL_SERVICE_NAME is
# set per process only when the caller did not set it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
S=$ROOT/target/stack
PIDS=$S/pids LOGS=$S/logs SECRETS=$S/secrets TLS=$S/tls
REALM=CORP.WRITEBACK.TEST FOREST=corp.writeback.test DC_IP=127.0.0.2
REDIS_PORT=6390 GW_A=127.0.0.1:7443 GW_B=127.0.0.1:7444 TENANT=demo
# Redis's default user is disabled: the gateways log in as ACL user `writeback`, whose password
# is in a private file (never on a command line); REDIS_URL carries the user only.
REDIS_USER=writeback
REDIS_URL=redis://$REDIS_USER@127.0.0.1:$REDIS_PORT
TOKEN_FILE=$S/tenant.token
BIN=$ROOT/target/debug
READY_SECS=${STACK_READY_SECS:-30}
mkdir -p "$PIDS" "$LOGS" "$SECRETS"; chmod 700 "$SECRETS"
t0=$(date +%s%N)

step() { printf '==> %s\n' "$*"; }
# The executable name each stack process runs as (/proc/PID/comm), so that a stale pid file
# naming a reused pid is not taken for a live process.
comm_of() { case $1 in redis) echo redis-server ;; samba) echo samba ;; gateway-*) echo cloud-gateway ;; agent-*) echo onprem-agent ;; esac; }
# A zombie (exited, not yet reaped: init takes a second or so here) counts as dead.
running() { local st; st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; st=${st##*) }; [ "${st:0:1}" != Z ] && [ "${st:0:1}" != X ]; }
alive() {
  local pid
  pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(comm_of "$1")" ] && running "$pid"
}
fail() { # message [process name whose log to show]
  echo "error: $1" >&2
  if [ -n "${2:-}" ] && [ -f "$LOGS/$2.log" ]; then
    echo "--- last lines of $LOGS/$2.log:" >&2; tail -n 25 "$LOGS/$2.log" >&2
  fi
  exit 1
}
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
wait_port() { # host port name
  local i
  for ((i = 0; i < READY_SECS * 10; i++)); do
    port_open "$1" "$2" && alive "$3" && return 0
    alive "$3" || fail "$3 exited during start-up" "$3"
    sleep 0.1
  done
  fail "$3 is not listening on $1:$2 after ${READY_SECS}s" "$3"
}
# Start NAME in the background in a session of its own; stdout+stderr to logs/NAME.log (the
# previous log is kept as NAME.log.prev); pid to pids/NAME.pid.
launch() { # name command...
  local name=$1; shift
  [ -f "$LOGS/$name.log" ] && mv -f "$LOGS/$name.log" "$LOGS/$name.log.prev"
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  local pid=$! i
  echo "$pid" >"$PIDS/$name.pid"
  # until the forked shell has exec'd the program, /proc/PID/comm still names bash or setsid
  for ((i = 0; i < 50; i++)); do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(comm_of "$name")" ] && return 0
    running "$pid" || return 0   # exited at once: wait_port/readiness reports it with its log
    sleep 0.02
  done
}
not_taken() { # host port name: refuse to start NAME when something else holds its port
  if port_open "$1" "$2"; then
    fail "$1:$2 is taken by a process the stack did not start (see: ss -ltnp 'sport = :$2'); cannot start $3"
  fi
}

step "dependencies"
scripts/install-deps.sh

step "build (cargo build --workspace --bins)"
cargo build --workspace --bins || fail "cargo build failed"
for b in cloud-gateway onprem-agent relayctl; do [ -x "$BIN/$b" ] || fail "$BIN/$b was not built"; done

step "tls and keys"
if [ ! -s "$TLS/gateway.pem" ] || [ ! -s "$TLS/gateway.key" ] || [ ! -s "$TLS/ca.pem" ]; then
  mkdir -p "$TLS"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=writeback demo CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$TLS/ca.key" -out "$TLS/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$TLS/gateway.key" -out "$TLS/gateway.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' >"$TLS/ext.cnf"
  openssl x509 -req -in "$TLS/gateway.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" -CAcreateserial \
    -days 3650 -extfile "$TLS/ext.cnf" -out "$TLS/gateway.pem" 2>/dev/null
  chmod 600 "$TLS/ca.key" "$TLS/gateway.key"
  echo "issued $TLS/gateway.pem (IP:127.0.0.1, DNS:localhost) signed by $TLS/ca.pem"
fi
if [ ! -s "$SECRETS/master.key" ]; then
  (umask 077; "$BIN/cloud-gateway" admin gen-master-key >"$SECRETS/master.key.new")
  mv "$SECRETS/master.key.new" "$SECRETS/master.key"
  echo "generated $SECRETS/master.key"
fi

step "redis on 127.0.0.1:$REDIS_PORT (ACL user $REDIS_USER)"
REDIS_PASSWORD_FILE=$SECRETS/redis.password REDIS_ACL=$SECRETS/redis.acl
if [ ! -s "$REDIS_PASSWORD_FILE" ]; then
  (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$REDIS_PASSWORD_FILE")
fi
acl_now="user default off
user $REDIS_USER on >$(cat "$REDIS_PASSWORD_FILE") ~* &* +@all"
if [ "$(cat "$REDIS_ACL" 2>/dev/null)" != "$acl_now" ]; then
  (umask 077; printf '%s\n' "$acl_now" >"$REDIS_ACL")
  # A Redis started before (without this user) is restarted with it; its data stays.
  if alive redis; then kill "$(cat "$PIDS/redis.pid")"; for ((i = 0; i < 50; i++)); do alive redis || break; sleep 0.1; done; fi
fi
if alive redis; then
  echo "running (pid $(cat "$PIDS/redis.pid"))"
else
  not_taken 127.0.0.1 "$REDIS_PORT" redis
  mkdir -p "$S/redis"
  # Accepted means durable: every write is in the append-only file, fsynced, before Redis
  # answers (README: what Redis must guarantee).
  launch redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$S/redis" \
    --save 60 1 --appendonly yes --appendfsync always --daemonize no --aclfile "$REDIS_ACL"
fi
wait_port 127.0.0.1 "$REDIS_PORT" redis

step "samba AD DC $REALM on $DC_IP (scripts/ad-dc.sh)"
if ! scripts/ad-dc.sh "$S/samba" "$REALM" "$DC_IP" >"$LOGS/samba-setup.log" 2>&1; then
  cat "$LOGS/samba-setup.log" >&2
  fail "scripts/ad-dc.sh failed (samba's own log: $S/samba/log/samba.out)"
fi
tail -n 1 "$LOGS/samba-setup.log"
cp "$S/samba/run/samba.pid" "$PIDS/samba.pid"
ln -sf "$S/samba/log/samba.out" "$LOGS/samba.log"
# shellcheck disable=SC1091 # written by ad-dc.sh: DC_LDAPS_URL DC_CA DC_BASE_DN DC_SVC_UPN KRB5_CONFIG ...
. "$S/samba/env"
(umask 077; printf '%s' "${SVC_PASS:-Svc#Writeback1}" >"$SECRETS/svc.password")

step "tenant $TENANT and agent credentials"
# options after the subcommand: the binary does not take them before it (yet)
admin() { timeout 30 "$BIN/cloud-gateway" admin "$1" --redis-url "$REDIS_URL" --redis-password-file "$REDIS_PASSWORD_FILE" --master-key-file "$SECRETS/master.key" "${@:2}"; }
[ -s "$TOKEN_FILE" ] || [ ! -s "$SECRETS/tenant.token" ] || mv "$SECRETS/tenant.token" "$TOKEN_FILE"   # older layout
new_tenant=
# Records format 2: token and agent-credential records carry a MAC under the master key; a stack
# made before holds records the gateway now refuses: re-issue the token and the agent secrets.
if [ "$(cat "$S/records-format" 2>/dev/null)" != 2 ]; then
  rm -f "$TOKEN_FILE" "$SECRETS"/agent-*.secret
  for a in agent-1 agent-2; do
    if alive "$a"; then kill -TERM "$(cat "$PIDS/$a.pid")" 2>/dev/null || true; fi
  done
  for a in agent-1 agent-2; do for _ in $(seq 100); do alive "$a" || break; sleep 0.1; done; done
fi
token=$(admin create-tenant --tenant "$TENANT" --if-missing) || fail "cloud-gateway admin create-tenant failed"
if [ -n "$token" ]; then
  # a new tenant (first run, or Redis lost its data): keep its token; agent secrets are re-issued below
  new_tenant=1; (umask 077; printf '%s\n' "$token" >"$TOKEN_FILE"); echo "created tenant $TENANT"
elif [ ! -s "$TOKEN_FILE" ]; then
  # the tenant exists but its token was lost locally: rotate it
  (umask 077; admin create-tenant --tenant "$TENANT" >"$TOKEN_FILE") || fail "cannot rotate the token of tenant $TENANT"
  echo "rotated the token of tenant $TENANT (token file was missing)"
fi
chmod 600 "$TOKEN_FILE"
for a in agent-1 agent-2; do
  if [ -n "$new_tenant" ] && alive "$a"; then   # its secret is unknown to this Redis: restart it
    kill -TERM "$(cat "$PIDS/$a.pid")" 2>/dev/null || true
    for _ in $(seq 100); do alive "$a" || break; sleep 0.1; done
  fi
  if ! alive "$a" || [ ! -s "$SECRETS/$a.secret" ]; then
    (umask 077; admin register-agent --tenant "$TENANT" --forest "$FOREST" --agent-id "$a" >"$SECRETS/$a.secret") \
      || fail "cloud-gateway admin register-agent $a failed"
  fi
done
echo 2 >"$S/records-format"

start_gateway() { # name addr metrics-addr
  if alive "$1"; then echo "$1 running (pid $(cat "$PIDS/$1.pid"))"; return 0; fi
  not_taken "${2%:*}" "${2##*:}" "$1"
  OTEL_SERVICE_NAME=${OTEL_SERVICE_NAME:-cloud-gateway} \
    launch "$1" "$BIN/cloud-gateway" serve --listen "$2" \
    --tls-cert "$TLS/gateway.pem" --tls-key "$TLS/gateway.key" \
    --redis-url "$REDIS_URL" --redis-password-file "$REDIS_PASSWORD_FILE" \
    --master-key-file "$SECRETS/master.key" --replica-id "$1" \
    --metrics-listen "$3"
}
start_agent() { # name gateway-addr metrics-addr (loopback)
  if alive "$1"; then echo "$1 running (pid $(cat "$PIDS/$1.pid"))"; return 0; fi
  OTEL_SERVICE_NAME=${OTEL_SERVICE_NAME:-onprem-agent} \
    launch "$1" "$BIN/onprem-agent" run --gateway-url "https://$2" --gateway-ca "$TLS/ca.pem" \
    --agent-id "$1" --agent-secret-file "$SECRETS/$1.secret" --forest "$FOREST" \
    --ldap-url "$DC_LDAPS_URL" --ldap-ca "$DC_CA" --bind-dn "$DC_SVC_UPN" \
    --bind-password-file "$SECRETS/svc.password" --base-dn "$DC_BASE_DN" --metrics-listen "$3" \
    --state-dir "$S/agents/$1"
}

step "gateways gateway-a ($GW_A), gateway-b ($GW_B)"
start_gateway gateway-a "$GW_A" 127.0.0.1:9101
start_gateway gateway-b "$GW_B" 127.0.0.1:9102
wait_port 127.0.0.1 "${GW_A##*:}" gateway-a
wait_port 127.0.0.1 "${GW_B##*:}" gateway-b

step "agents agent-1 -> gateway-a, agent-2 -> gateway-b"
start_agent agent-1 "$GW_A" 127.0.0.1:9201
start_agent agent-2 "$GW_B" 127.0.0.1:9202
# ready = each agent logged its session and the gateways list it live on its replica
relayctl() { WRITEBACK_TOKEN=$(cat "$TOKEN_FILE") timeout 40 "$BIN/relayctl" --addr "$GW_A" --ca "$TLS/ca.pem" --tenant "$TENANT" "$@"; }
for pair in agent-1:gateway-a agent-2:gateway-b; do
  a=${pair%:*} gw=${pair#*:} ok=
  for ((i = 0; i < READY_SECS * 5; i++)); do
    alive "$a" || fail "$a exited during start-up" "$a"
    if grep -q "connected to gateway" "$LOGS/$a.log" \
      && relayctl agents 2>/dev/null | grep -Eq "^ +$a +.* via $gw +.* live "; then ok=1; break; fi
    sleep 0.2
  done
  [ -n "$ok" ] || fail "$a did not connect to $gw within ${READY_SECS}s" "$a"
  echo "$a connected via $gw"
done

cat >"$S/stack.env.new" <<ENV
WRITEBACK_ADDR=$GW_A
WRITEBACK_ADDRS=$GW_A,$GW_B
WRITEBACK_CA=$TLS/ca.pem
WRITEBACK_TENANT=$TENANT
WRITEBACK_TOKEN=$(cat "$TOKEN_FILE")
WRITEBACK_FOREST=$FOREST
REDIS_URL=$REDIS_URL
REDIS_PASSWORD_FILE=$REDIS_PASSWORD_FILE
AD_LDAP_URL=$DC_LDAPS_URL
AD_CA=$DC_CA
AD_BASE_DN=$DC_BASE_DN
AD_REALM=$REALM
AD_ADMIN_DN=CN=Administrator,CN=Users,$DC_BASE_DN
AD_ADMIN_PASSWORD=${ADMINPASS:-Adm1n!Passw0rd}
KRB5_CONFIG=$KRB5_CONFIG
ENV
chmod 600 "$S/stack.env.new"; mv -f "$S/stack.env.new" "$S/stack.env"

step "demo: reset alice's password through gateway-a"
pwfile=$(mktemp "$SECRETS/demo.XXXXXX"); trap 'rm -f "$pwfile"' EXIT
printf 'Demo-%s#1a' "$(openssl rand -hex 8)" >"$pwfile"   # never printed
rc=0; relayctl submit --forest "$FOREST" --user alice --reset --password-stdin <"$pwfile" || rc=$?
[ "$rc" -eq 0 ] || fail "the demo reset was not applied (relayctl exit $rc)" gateway-a
if LDAPTLS_CACERT=$DC_CA timeout 10 ldapsearch -LLL -x -o nettimeout=5 -H "$DC_LDAPS_URL" -D "alice@$FOREST" -y "$pwfile" \
  -s base -b "" dn >/dev/null 2>&1; then
  echo "verified: alice can bind with the new password"
else
  fail "alice cannot bind to $DC_LDAPS_URL with the new password (or the DC did not answer within 10 s)"
fi

echo
ms=$((($(date +%s%N) - t0) / 1000000))
echo "stack is up ($((ms / 1000)).$((ms % 1000 / 100)) s):"
echo "  set -a; . target/stack/stack.env; set +a        # WRITEBACK_*, AD_*, REDIS_URL, KRB5_CONFIG"
echo "  target/debug/relayctl agents                    # agents and forest health"
echo "  logs: target/stack/logs/<name>.log  pids: target/stack/pids/<name>.pid"
echo "  metrics: gateways http://127.0.0.1:9101/metrics http://127.0.0.1:9102/metrics," \
  "agents http://127.0.0.1:9201/metrics http://127.0.0.1:9202/metrics"
echo "  make down to stop"
