#!/usr/bin/env bash
# package-agent.sh: builds the agent's Debian package from a built onprem-agent binary.
#   scripts/package-agent.sh [--profile release|debug] [--out DIR]
# Default: release (run `cargo build --release -p onprem-agent` first), into target/package/.
# Prints the path of the .deb. The package holds the binary, the hardened systemd unit, an
# example /etc/onprem-agent/agent.toml and docs/install-agent.md; its postinst creates the
# onprem-agent user and the owner-only state directory (packaging/agent/).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release out=target/package
while [ $# -gt 0 ]; do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "package-agent.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
bin=target/$profile/onprem-agent
[ -x "$bin" ] || { echo "package-agent.sh: $bin is missing: cargo build --profile ${profile/debug/dev} -p onprem-agent" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -D -m 0755 "$bin" "$root/usr/bin/onprem-agent"
install -D -m 0644 packaging/agent/onprem-agent.service "$root/lib/systemd/system/onprem-agent.service"
install -D -m 0640 packaging/agent/agent.toml.example "$root/etc/onprem-agent/agent.toml"
install -D -m 0644 docs/install-agent.md "$root/usr/share/doc/onprem-agent/install-agent.md"
install -d -m 0755 "$root/DEBIAN"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" packaging/agent/debian/control >"$root/DEBIAN/control"
echo "Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)" >>"$root/DEBIAN/control"
install -m 0644 packaging/agent/debian/conffiles "$root/DEBIAN/conffiles"
for s in postinst prerm postrm; do install -m 0755 "packaging/agent/debian/$s" "$root/DEBIAN/$s"; done
mkdir -p "$out"
deb="$out/onprem-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip -z1 --build "$root" "$deb" >/dev/null
echo "$deb"
