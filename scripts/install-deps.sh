#!/usr/bin/env bash
# install-deps.sh - install the Debian packages the stack and the tests need, if missing.
# Fast path (all present): one dpkg-query, no apt. Never leaves system daemons running: the stack
# and the tests start their own Redis and Samba on their own addresses and ports, and a system
# redis-server (127.0.0.1:6379) or samba-ad-dc (389/636 on every address) would get in the way.
set -euo pipefail
# redis-sentinel: the Sentinel tests (cloud-gateway/tests/topologies.rs; redis-server brings
# redis-cli, which forms their Redis Cluster). faketime: libfaketime, which the fault suite
# (e2e/tests/faults.rs) preloads to skew the clocks of gateway and agent processes. umoci: unpacks
# the OCI image scripts/build-image.sh makes (e2e/tests/image.rs).
PKGS=(redis-server redis-sentinel samba ldap-utils krb5-user winbind openssl bc prometheus faketime umoci)
# Debian's recommended packages are kept (samba-ad-provision and samba-dsdb-modules, needed by
# `samba-tool domain provision`, are only Recommends of samba). prometheus is there for promtool
# (scripts/k8s-check.sh: `promtool check rules` and `promtool test rules`); its server and the
# recommended prometheus-node-exporter are stopped below like the other daemons.

missing=()
installed=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${PKGS[@]}" 2>/dev/null || true)
for p in "${PKGS[@]}"; do
  grep -qE "^$p ii" <<<"$installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}"
SUDO=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "not root and no sudo: install ${missing[*]} yourself" >&2; exit 1; }
  SUDO=sudo
fi
t0=$SECONDS
# Keep package scripts from starting system-wide daemons (invoke-rc.d and deb-systemd-invoke both
# honour policy-rc.d; exit 101 = action forbidden). Docker images already ship such a file: keep it.
policy=/usr/sbin/policy-rc.d created_policy=
if [ ! -e $policy ]; then
  printf '#!/bin/sh\n# written by install-deps.sh for the duration of one apt-get install\nexit 101\n' \
    | $SUDO tee $policy >/dev/null
  $SUDO chmod 755 $policy; created_policy=1
fi
cleanup() { if [ -n "$created_policy" ]; then $SUDO rm -f $policy; fi; }
trap cleanup EXIT
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  "${missing[@]}" >/dev/null

# Belt and braces: stop (and, under systemd, disable at boot) the daemons of what was just installed.
units=()
for p in "${missing[@]}"; do
  case $p in
    redis-server) units+=(redis-server) ;;
    redis-sentinel) units+=(redis-sentinel) ;;
    samba) units+=(samba-ad-dc smbd nmbd) ;;
    winbind) units+=(winbind) ;;
    prometheus) units+=(prometheus prometheus-node-exporter) ;;
  esac
done
if [ ${#units[@]} -gt 0 ]; then
  if [ -d /run/systemd/system ]; then   # systemd is PID 1
    $SUDO systemctl disable --now "${units[@]}" >/dev/null 2>&1 || true
  else
    for u in "${units[@]}"; do $SUDO service "$u" stop >/dev/null 2>&1 || true; done
  fi
fi
echo "installed: ${missing[*]} ($((SECONDS - t0)) s)"
