#!/usr/bin/env bash
# build-image.sh: assembles the relay's OCI image (the same contents as
# packaging/image/Dockerfile: cloud-gateway as entrypoint, onprem-agent, relayctl, glibc, CA
# certificates, a non-root user, no shell) without pulling any base image, from binaries
# already built here.
#   scripts/build-image.sh [--profile release|debug] [--out DIR]
# Writes an OCI image layout to DIR/oci (load it with `skopeo copy oci:DIR/oci:cloud-gateway:V
# docker-daemon:...` or `podman load`), and the unpacked root filesystem to DIR/rootfs. Prints
# DIR. The binaries' shared libraries are taken from this host (ldd), so build on the Debian
# release the image should match.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release out=target/image
while [ $# -gt 0 ]; do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
bins=(cloud-gateway relayctl onprem-agent)
for b in "${bins[@]}"; do
  [ -x "target/$profile/$b" ] || { echo "build-image.sh: target/$profile/$b is missing (cargo build --bins${profile/debug/})" >&2; exit 1; }
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
rm -rf "$out"
rootfs=$out/rootfs oci=$out/oci
mkdir -p "$rootfs"/{usr/local/bin,etc/ssl/certs,tmp} "$oci/blobs/sha256"
chmod 1777 "$rootfs/tmp"
for b in "${bins[@]}"; do install -m 0755 "target/$profile/$b" "$rootfs/usr/local/bin/$b"; done
# The dynamic loader and every library the binaries link, at the same paths.
libs=$(for b in "${bins[@]}"; do ldd "target/$profile/$b"; done | grep -oE '/[^ ]+' | sort -u)
for l in $libs; do
  mkdir -p "$rootfs$(dirname "$l")"
  cp -L "$l" "$rootfs$l"
done
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
# One layer, reproducible: fixed owner and times, sorted.
layer=$out/layer.tar
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$rootfs" -cf "$layer" .
diff_id=$(sha256sum "$layer" | cut -d' ' -f1)
gzip -n -1 -c "$layer" >"$layer.gz"
layer_digest=$(sha256sum "$layer.gz" | cut -d' ' -f1)
layer_size=$(stat -c %s "$layer.gz")
mv "$layer.gz" "$oci/blobs/sha256/$layer_digest"
rm -f "$layer"
arch=$(dpkg --print-architecture)
cat >"$out/config.json" <<JSON
{"architecture":"$arch","os":"linux","config":{"User":"65532:65532","Entrypoint":["/usr/local/bin/cloud-gateway"],"Cmd":["serve"],"ExposedPorts":{"7443/tcp":{},"9090/tcp":{}},"Env":["PATH=/usr/local/bin"],"Labels":{"org.opencontainers.image.title":"cloud-gateway","org.opencontainers.image.version":"$version"}},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]}}
JSON
config_digest=$(sha256sum "$out/config.json" | cut -d' ' -f1)
config_size=$(stat -c %s "$out/config.json")
mv "$out/config.json" "$oci/blobs/sha256/$config_digest"
cat >"$out/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config_digest","size":$config_size},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:$layer_digest","size":$layer_size}]}
JSON
manifest_digest=$(sha256sum "$out/manifest.json" | cut -d' ' -f1)
manifest_size=$(stat -c %s "$out/manifest.json")
mv "$out/manifest.json" "$oci/blobs/sha256/$manifest_digest"
printf '{"imageLayoutVersion":"1.0.0"}\n' >"$oci/oci-layout"
cat >"$oci/index.json" <<JSON
{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest_digest","size":$manifest_size,"annotations":{"org.opencontainers.image.ref.name":"$version"}}]}
JSON
echo "$out"
