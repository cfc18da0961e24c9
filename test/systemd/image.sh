#!/bin/sh
# Builds (once) the Debian bookworm machine image that the real-systemd test
# boots with systemd-nspawn, and caches it as a tar.zst. Usage: image.sh OUT
# (default /var/cache/leased-systemd-test/bookworm.tar.zst). The packages
# come from the mirror apt on this machine already uses. Needs mmdebstrap
# and zstd (test/deps.sh installs them).
set -eu
out=${1:-/var/cache/leased-systemd-test/bookworm.tar.zst}
[ -s "$out" ] && exit 0
mkdir -p "$(dirname "$out")"
mirror=http://deb.debian.org/debian
security=http://deb.debian.org/debian-security
if [ -r /etc/apt/sources.list.d/debian.sources ]; then
  m=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  s=$(awk '/^URIs:/ && $2 ~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  [ -n "$m" ] && mirror=$m
  [ -n "$s" ] && security=$s
fi
tmp=$(mktemp -d /var/tmp/leased-image.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
mmdebstrap --variant=minbase --quiet \
  --include=systemd,systemd-sysv,dbus,iproute2,iptables,docker.io,ca-certificates,procps,iputils-ping,busybox-static,init-system-helpers \
  bookworm "$tmp/root" \
  "deb $mirror bookworm main" "deb $mirror bookworm-updates main" "deb $security bookworm-security main"
r=$tmp/root
# Units that must not start on their own in the test machines.
systemctl --root="$r" disable docker.service docker.socket containerd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
systemctl --root="$r" mask systemd-firstboot.service getty@tty1.service console-getty.service systemd-timesyncd.service >/dev/null 2>&1 || true
# Every machine booted from this tree gets its own name and machine-id.
rm -f "$r/etc/hostname"
: >"$r/etc/machine-id"
# A busybox image for containers (no registry is reachable).
mkdir -p "$r/opt/busybox/bin"
cp "$r/bin/busybox" "$r/opt/busybox/bin/busybox"
for l in sh ip ping sleep nc wget httpd cat; do ln -sf busybox "$r/opt/busybox/bin/$l"; done
apt-get clean -o RootDir="$r" 2>/dev/null || true
rm -rf "$r/var/lib/apt/lists/"* "$r/var/cache/apt/"*.bin
tar -C "$r" --numeric-owner -cf - . | zstd -q -T0 -o "$out.tmp"
mv "$out.tmp" "$out"
