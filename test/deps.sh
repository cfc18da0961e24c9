#!/usr/bin/env bash
# Installs the system packages the lab and the tests use, when missing
# (gcc and libc6-dev: cgo, for make test's race detector run;
# systemd-container, mmdebstrap and zstd: the real-systemd test in
# test/systemd; lintian: make test checks the Debian package; docker-compose:
# TestDockerIPAMCompose).
# Debian/Ubuntu, as root. Extra package names can be passed as arguments.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
for pkg_cmd in iproute2:ip iptables:iptables iputils-ping:ping procps:sysctl etcd-server:etcd \
    systemd:systemd-analyze docker.io:dockerd busybox-static:busybox-static \
    gcc:gcc libc6-dev:libc6-dev systemd-container:systemd-nspawn mmdebstrap:mmdebstrap \
    zstd:zstd lintian:lintian prometheus:promtool docker-compose:docker-compose "$@"; do
  pkg=${pkg_cmd%%:*} cmd=${pkg_cmd#*:}
  if [ "$pkg" = "$cmd" ]; then
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  else
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
  fi
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${need[*]} (run as root, or apt-get install them)" >&2
    exit 1
  fi
  # Install without starting daemons: on a machine whose PID 1 is systemd,
  # installing etcd-server, docker.io or prometheus would otherwise start an
  # etcd on :2379, a dockerd and a Prometheus on :9090. The tests start
  # their own; policy-rc.d (honoured by invoke-rc.d and deb-systemd-invoke)
  # says no for the time of the install, unless the machine has its own.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
