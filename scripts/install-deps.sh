#!/usr/bin/env bash
# install-deps.sh - install the Debian packages the stack and the tests need, if missing.
# Fast path (all present): one dpkg-query, no apt. Never leaves system daemons running.
set -euo pipefail
PKGS=(redis-server samba ldap-utils krb5-user winbind openssl bc)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}"
SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
# Keep package scripts from starting system-wide redis/samba daemons (they would take
# 6379/389/636 on every address); the stack and the tests start their own.
policy=/usr/sbin/policy-rc.d; created_policy=
if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' | $SUDO tee $policy >/dev/null; $SUDO chmod +x $policy; created_policy=1; fi
trap '[ -n "$created_policy" ] && $SUDO rm -f $policy' EXIT
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
# belt and braces: stop anything the packages started anyway
for svc in redis-server samba-ad-dc smbd nmbd winbind; do $SUDO service "$svc" stop >/dev/null 2>&1 || true; done
echo "installed: ${missing[*]}"
