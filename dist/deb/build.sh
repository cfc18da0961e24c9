#!/bin/sh
# Builds the leased Debian package with dpkg-deb: make deb (which builds
# BIN first). Usage: dist/deb/build.sh BIN VERSION OUTDIR
# Prints the path of the .deb.
set -eu
bin=$1 version=$2 out=$3
top=$(cd "$(dirname "$0")/../.." && pwd)
arch=$(dpkg --print-architecture)
pkg=$out/leased_${version}_${arch}
rm -rf "$pkg"
umask 022
d=$pkg
install -d "$d/DEBIAN" "$d/usr/bin" "$d/lib/systemd/system" "$d/etc/default" \
    "$d/usr/share/doc/leased/examples" "$d/usr/share/man/man8" \
    "$d/usr/share/bash-completion/completions"
install -m 0755 "$bin" "$d/usr/bin/leased"
# The packaged unit runs the packaged binary.
sed 's|/usr/local/bin/leased|/usr/bin/leased|g' "$top/dist/leased.service" >"$d/lib/systemd/system/leased.service"
install -m 0644 "$top/dist/leased-docker-restart.path" "$top/dist/leased-docker-restart.service" "$d/lib/systemd/system/"
chmod 0644 "$d/lib/systemd/system/leased.service"
# May hold an etcd password: readable by root only.
install -m 0600 "$top/dist/leased.default" "$d/etc/default/leased"
install -m 0644 "$top/dist/docker.service.d/10-leased.conf" "$top"/dist/examples/*.json "$d/usr/share/doc/leased/examples/"
install -m 0644 "$top/dist/prometheus/leased-rules.yml" "$d/usr/share/doc/leased/examples/"
install -m 0644 "$top/README.md" "$top"/Documentation/*.md "$d/usr/share/doc/leased/"
install -m 0644 "$top/dist/deb/copyright" "$d/usr/share/doc/leased/copyright"
date=$(TZ=UTC git -C "$top" log -1 --format=%cd --date=format-local:'%a, %d %b %Y %H:%M:%S +0000' 2>/dev/null || date -R)
printf 'leased (%s) unstable; urgency=medium\n\n  * Built from %s.\n\n -- leased maintainers <leased@example.org>  %s\n' \
    "$version" "$(git -C "$top" rev-parse --short=12 HEAD 2>/dev/null || echo 'a source tree')" "$date" |
    gzip -9n >"$d/usr/share/doc/leased/changelog.gz"
"$bin" man | gzip -9n >"$d/usr/share/man/man8/leased.8.gz"
"$bin" completion bash >"$d/usr/share/bash-completion/completions/leased"
chmod 0644 "$d/usr/share/man/man8/leased.8.gz" "$d/usr/share/bash-completion/completions/leased"
install -D -m 0644 "$top/dist/deb/lintian-overrides" "$d/usr/share/lintian/overrides/leased"
install -m 0755 "$top/dist/deb/postinst" "$top/dist/deb/prerm" "$top/dist/deb/postrm" "$d/DEBIAN/"
echo /etc/default/leased >"$d/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$d" | cut -f1)
cat >"$d/DEBIAN/control" <<CONTROL
Package: leased
Version: $version
Architecture: $arch
Maintainer: leased maintainers <leased@example.org>
Installed-Size: $size
Depends: iptables, iproute2
Recommends: docker.io | docker-ce
Suggests: etcd-client
Section: net
Priority: optional
Homepage: https://github.com/leased/leased
Description: container network agent for Docker hosts, backed by etcd
 leased runs on every Docker host. It leases the host a slice of a cluster
 network from etcd (an IPv6 subnet and, when enabled, an IPv4 subnet),
 writes it to /run/leased/subnet.env for dockerd, and programs the kernel so
 that containers on every host reach each other: host-gw routes, VXLAN
 devices, or proxy NDP on an upstream /64.
CONTROL
(cd "$d" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$d/DEBIAN/md5sums"
chmod 0644 "$d/DEBIAN/control" "$d/DEBIAN/conffiles" "$d/DEBIAN/md5sums"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$pkg.deb" >/dev/null
rm -rf "$pkg"
echo "$pkg.deb"
