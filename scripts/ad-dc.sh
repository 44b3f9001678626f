#!/usr/bin/env bash
# ad-dc.sh - a Samba AD DC confined to one directory and one loopback IP (make up, tests).
# Derived from the verified recipe in ../shared/ad-lab/start-dc.sh.
#   ad-dc.sh [--template TDIR] DIR REALM IP   provision (first run only; or copy TDIR), start (unless
#                                             running), seed users/ACL, write DIR/env, print READY
#   ad-dc.sh --stop DIR                       stop the DC started from DIR
# --template TDIR (or env DC_TEMPLATE): when DIR is not provisioned yet, copy TDIR (a provisioned,
# seeded, STOPPED DC dir of the same realm) instead of provisioning (0.5 s instead of 4-8 s).
# Whenever DIR was copied from elsewhere or is to run on another IP (DIR/.target differs), the
# script rewrites what depends on them: paths and `interfaces` in smb.conf, the TLS server
# certificate (IP SAN, signed by the DC's own CA in DIR/tls) and krb5.conf.
# e.g. ad-dc.sh "$(mktemp -d)/corp" CORP.EXAMPLE.TEST 127.0.0.10
# Env (optional): ADMINPASS SVC_PASS USER_PASS DC_DOMAIN DC_HOST DC_MODEL(single|prefork)
#   DC_SERVICES("ldap, kdc") DC_NOSYNC(1) DELEGATE_DN(domain root) PROTECT_ADMINS(1) READY_TIMEOUT(60)
#   MIN_PWD_AGE(0: days before a password may be changed again; AD's default is 1) DC_TEMPLATE
# Password policy seeded: complexity on, minimum length 7, history 24, minimum age MIN_PWD_AGE days.
# Needs: apt-get install -y samba ldap-utils krb5-user winbind   (openssl, bc)
set -euo pipefail

# Whether process $1 is the samba of DC dir $2 (a stale pid file may name a reused pid; samba
# rewrites its command line, so look at the files it holds open instead).
runs_dir() { [ -n "$1" ] && ls -l "/proc/$1/fd" 2>/dev/null | grep -qF -- "-> $2/private/"; }
stop_dc() {
  local dir=$1 pid
  pid=$(cat "$dir/run/samba.pid" 2>/dev/null || true)
  if ! runs_dir "$pid" "$dir"; then echo "not running: $dir"; return 0; fi
  kill -TERM "$pid"   # smbd/winbindd (if enabled) exit by themselves when their samba parent goes
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { echo "stopped $dir"; return 0; }; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true; echo "killed $dir (pid $pid)"
}
usage() { sed -n '2,17p' "$0"; exit 2; }
if [ "${1:-}" = "--stop" ]; then [ $# -eq 2 ] || usage; stop_dc "$(realpath -m "$2")"; exit 0; fi
TEMPLATE=${DC_TEMPLATE:-}
if [ "${1:-}" = "--template" ]; then [ $# -ge 2 ] || usage; TEMPLATE=$2; shift 2; fi
command -v samba-tool >/dev/null || { echo "samba-tool not found: run scripts/install-deps.sh"; exit 1; }
[ $# -eq 3 ] || usage

DIR=$(realpath -m "$1"); REALM=${2^^}; IP=$3
LREALM=${REALM,,}; BASE="DC=${LREALM//./,DC=}"
DOMAIN=${DC_DOMAIN:-${REALM%%.*}}; DOMAIN=${DOMAIN:0:15}
HOST=${DC_HOST:-dc${IP##*.}}
if [ -z "${DC_HOST:-}" ] && [ -f "$DIR/etc/smb.conf" ]; then   # a copied DC keeps its name
  HOST=$(awk -F' = ' '/^\tnetbios name = /{print tolower($2)}' "$DIR/etc/smb.conf"); HOST=${HOST:-dc${IP##*.}}
fi
ADMINPASS=${ADMINPASS:-'Adm1n!Passw0rd'}; SVC_PASS=${SVC_PASS:-'Svc#Writeback1'}; USER_PASS=${USER_PASS:-'Initial#Pass1'}
CONF=$DIR/etc/smb.conf; TLS=$DIR/tls
export LDAPTLS_CACERT=$TLS/ca.pem
st() { samba-tool "$@" -s "$CONF"; }
t0=$(date +%s.%N); el() { printf '%.2fs' "$(echo "$(date +%s.%N) - $t0" | bc)"; }

server_cert() {  # server certificate for this DC's name and IP, signed by the DC's own CA
  # (a copied DC keeps its key: only the certificate changes, no key generation)
  [ -f "$TLS/key.pem" ] || openssl genrsa -out "$TLS/key.pem" 2048 2>/dev/null
  openssl req -new -key "$TLS/key.pem" -subj "/CN=$HOST.$LREALM" -out "$TLS/req.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s,DNS:%s,IP:%s\nextendedKeyUsage=serverAuth\n' "$HOST.$LREALM" "$LREALM" "$IP" > "$TLS/ext.cnf"
  openssl x509 -req -in "$TLS/req.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" -CAcreateserial -days 3650 \
    -extfile "$TLS/ext.cnf" -out "$TLS/cert.pem" 2>/dev/null
  chmod 600 "$TLS/key.pem" "$TLS/ca.key"
}

krb5_conf() {
  printf '[libdefaults]\n\tdefault_realm = %s\n\tdns_lookup_kdc = false\n\tdns_lookup_realm = false\n\trdns = false\n[realms]\n\t%s = {\n\t\tkdc = %s\n\t\tkpasswd_server = %s\n\t}\n' \
    "$REALM" "$REALM" "$IP" "$IP" > "$DIR/krb5.conf"
}

retarget() {  # DIR was copied from another directory and/or is to run on another IP
  local old_dir old_ip
  read -r old_dir old_ip < "$DIR/.target"
  if [ "$old_dir" != "$DIR" ]; then
    grep -rlF "$old_dir" "$DIR/etc" 2>/dev/null | xargs -r sed -i "s|$old_dir|$DIR|g"
  fi
  if [ "$old_ip" != "$IP" ]; then
    sed -i "s|^\tinterfaces = .*|\tinterfaces = $IP/8|" "$CONF"
    server_cert
  fi
  krb5_conf
  rm -f "$DIR/run/samba.pid"
  echo "$DIR $IP" > "$DIR/.target"
}

provision() {
  rm -rf "$DIR"; mkdir -p "$DIR"/{run,log} "$TLS"
  # own CA + server cert with SAN IP, so clients can verify ldaps://IP with LDAPTLS_CACERT / ca_certs_file
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=Test CA $REALM" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$TLS/ca.key" -out "$TLS/ca.pem" 2>/dev/null
  server_cert
  samba-tool domain provision --realm="$REALM" --domain="$DOMAIN" --host-name="$HOST" --host-ip="$IP" \
    --server-role=dc --dns-backend=NONE --use-rfc2307 --adminpass="$ADMINPASS" --targetdir="$DIR" \
    --option="interfaces=$IP/8" --option="bind interfaces only=yes" \
    --option="pid directory=$DIR/run" --option="ncalrpc dir=$DIR/run/ncalrpc" \
    --option="winbindd socket directory=$DIR/run/winbindd" --option="ntp signd socket directory=$DIR/run/ntp_signd" \
    --option="log file=$DIR/log/log.%m" --option="usershare path=$DIR/usershares" \
    --option="tls enabled=yes" --option="tls keyfile=$TLS/key.pem" --option="tls certfile=$TLS/cert.pem" \
    --option="tls cafile=$TLS/ca.pem" > "$DIR/log/provision.log" 2>&1 \
    || { tail -20 "$DIR/log/provision.log"; exit 1; }
  # provision writes its own 'server services' line: keep only what LDAP/Kerberos tests need.
  # 'old password allowed period = 0' (default 60: the OLD password keeps working for LDAP simple binds for
  # 60 min after a change/reset) is silently dropped when given to provision via --option, so add it here.
  local extra='\told password allowed period = 0'
  [ "${DC_NOSYNC:-1}" = 1 ] && extra="$extra\n\tldb:nosync = true"   # no fsync: ~2x faster password writes
  sed -i -e "s/^\tserver services = .*/\tserver services = ${DC_SERVICES:-ldap, kdc}/" \
         -e "s/^\[global\]$/[global]\n$extra/" "$CONF"
  krb5_conf
  echo "$DIR $IP" > "$DIR/.target"
  touch "$DIR/.provisioned"
}

from_template() {  # DIR := a copy of TEMPLATE (provisioned, seeded, stopped, same realm)
  local t tpid trealm
  t=$(realpath -m "$TEMPLATE")
  [ -f "$t/.seeded" ] || { echo "template $t is not a provisioned and seeded DC dir"; exit 1; }
  tpid=$(cat "$t/run/samba.pid" 2>/dev/null || true)
  if runs_dir "$tpid" "$t"; then
    echo "template $t is running (pid $tpid): stop it before copying"; exit 1
  fi
  trealm=$(awk -F' = ' '/^\trealm = /{print toupper($2)}' "$t/etc/smb.conf")
  [ "$trealm" = "$REALM" ] || { echo "template $t is realm $trealm, not $REALM"; exit 1; }
  rm -rf "$DIR"; mkdir -p "$(dirname "$DIR")"
  cp -a "$t" "$DIR"
  rm -f "$DIR/run/samba.pid" "$DIR/env"
  HOST=${DC_HOST:-$(awk -F' = ' '/^\tnetbios name = /{print tolower($2)}' "$CONF")}
}

seed() {  # alice + svc-writeback (not an admin) with only the delegated password rights
  # AD's defaults except the minimum age, so tests and the demo can change a password twice.
  st domain passwordsettings set --complexity=on --min-pwd-length=7 --history-length=24 \
    --min-pwd-age="${MIN_PWD_AGE:-0}" >/dev/null
  st user show alice >/dev/null 2>&1 || st user create alice "$USER_PASS" >/dev/null
  if ! st user show svc-writeback >/dev/null 2>&1; then
    st user create svc-writeback "$SVC_PASS" >/dev/null; st user setexpiry svc-writeback --noexpiry >/dev/null
  fi
  local sid u=bf967aba-0de6-11d0-a285-00aa003049e2 ddn=${DELEGATE_DN:-$BASE} aces unexp   # u = user class
  sid=$(st user show svc-writeback --attributes=objectSid | awk '/^objectSid:/{print $2}')
  aces="(OA;CIIO;CR;00299570-246d-11d0-a768-00aa006e0529;$u;$sid)(OA;CIIO;CR;ab721a53-1e2f-11d0-9819-00aa0040529b;$u;$sid)"
  aces+="(OA;CIIO;RPWP;28630ebf-41d5-11d1-a9c1-0000f80367c1;$u;$sid)(OA;CIIO;RPWP;bf967a0a-0de6-11d0-a285-00aa003049e2;$u;$sid)"
  st dsacl get --objectdn="$ddn" | grep -qF "$aces" || st dsacl set --objectdn="$ddn" --sddl="$aces" >/dev/null
  unexp="(OA;;CR;ccc2dc7d-a6ad-4a7a-8846-c04e3cc53501;;$sid)"
  st dsacl get --objectdn="$BASE" | grep -qF "$unexp" || st dsacl set --objectdn="$BASE" --sddl="$unexp" >/dev/null
  # Samba has no SDProp, so adminCount=1 objects (Administrator, Domain Admins...) would inherit the delegation.
  # Emulate AdminSDHolder: give them a protected (non-inheriting) DACL.
  [ "${PROTECT_ADMINS:-1}" = 1 ] || return 0
  /usr/bin/python3 - "$CONF" <<'PY'
import sys, ldb
from samba.samdb import SamDB
from samba.auth import system_session
from samba.param import LoadParm
from samba.sd_utils import SDUtils
from samba.dcerpc import security
lp = LoadParm(); lp.load(sys.argv[1])
db = SamDB(url=lp.private_path("sam.ldb"), session_info=system_session(), lp=lp)
sd = security.descriptor.from_sddl(
    "O:DAG:DAD:P(A;;RPWPCRCCDCLCLORCWOWDSDDTSW;;;SY)(A;;RPWPCRCCDCLCLORCWOWDSDSW;;;BA)"
    "(A;;RPWPCRCCDCLCLORCWOWDSW;;;DA)(A;;RPWPCRCCDCLCLORCWOWDSW;;;EA)(A;;RPLCLORC;;;AU)"
    "(OA;;CR;ab721a53-1e2f-11d0-9819-00aa0040529b;;WD)(OA;;CR;ab721a53-1e2f-11d0-9819-00aa0040529b;;PS)",
    security.dom_sid(db.get_domain_sid()))
for m in db.search(db.domain_dn(), ldb.SCOPE_SUBTREE, "(&(adminCount=1)(|(objectClass=user)(objectClass=group)))", ["dn"]):
    SDUtils(db).modify_sd_on_dn(m.dn, sd, controls=["sd_flags:1:%d" % security.SECINFO_DACL])
PY
}

# 1) provision once (.provisioned marker: a half-finished provision starts over), or copy a template
if [ ! -f "$DIR/.provisioned" ] && [ -n "$TEMPLATE" ]; then
  from_template; echo "copied template $TEMPLATE to $DIR ($(el))"
fi
[ -f "$DIR/.provisioned" ] || { provision; echo "provisioned $REALM in $DIR ($(el))"; }
[ "$(cat "$DIR/.target" 2>/dev/null)" = "$DIR $IP" ] || { retarget; echo "retargeted to $DIR on $IP ($(el))"; }

# 2) start unless already running (samba -i writes run/samba.pid itself)
pid=$(cat "$DIR/run/samba.pid" 2>/dev/null || true)
if runs_dir "$pid" "$DIR"; then
  echo "already running (pid $pid)"
else
  setsid samba -i -M "${DC_MODEL:-single}" -s "$CONF" >> "$DIR/log/samba.out" 2>&1 < /dev/null &
  spid=$!
fi

# 3) ready = rootDSE over *verified* LDAPS on IP returns our naming context
#    (a port conflict only kills samba's ldap task, the process stays up; another DC's rootDSE won't match)
#    Every wait is bounded by time (a frozen DC accepts TCP and then never answers).
nc=
ready_by=$((SECONDS + ${READY_TIMEOUT:-60}))
while [ "$SECONDS" -lt "$ready_by" ]; do
  nc=$(timeout 5 ldapsearch -LLL -x -o nettimeout=2 -H "ldaps://$IP" -s base -b "" defaultNamingContext 2>/dev/null \
       | awk '/^defaultNamingContext:/{print $2}') || true
  [ "$nc" = "$BASE" ] && break
  if [ -n "${spid:-}" ] && ! kill -0 "$spid" 2>/dev/null; then echo "samba exited:"; tail -20 "$DIR/log/samba.out"; exit 1; fi
  sleep 0.1
done
[ "$nc" = "$BASE" ] || { echo "not ready: the rootDSE of ldaps://$IP did not name $BASE within ${READY_TIMEOUT:-60}s"; tail -20 "$DIR/log/samba.out"; exit 1; }
echo "ldaps up ($(el))"

# 4) seed once (.seeded marker; every step is also idempotent on its own)
[ -f "$DIR/.seeded" ] || { seed; touch "$DIR/.seeded"; echo "seeded ($(el))"; }

cat > "$DIR/env" <<EOF
export DC_REALM=$REALM DC_DOMAIN=$DOMAIN DC_IP=$IP DC_BASE_DN=$BASE DC_LDAPS_URL=ldaps://$IP
export DC_CA=$TLS/ca.pem LDAPTLS_CACERT=$TLS/ca.pem KRB5_CONFIG=$DIR/krb5.conf DC_SMBCONF=$CONF
export DC_SVC_UPN=svc-writeback@$LREALM DC_USER_DN=CN=alice,CN=Users,$BASE
EOF
echo "READY realm=$REALM ip=$IP url=ldaps://$IP base=$BASE ca=$TLS/ca.pem krb5=$DIR/krb5.conf pid=$(cat "$DIR/run/samba.pid") env=$DIR/env ($(el))"
