#!/bin/sh
# Prints the version to stamp into leased and its Debian package: from the
# latest v<X.Y.Z> tag (git describe: 1.2.0, or 1.2.0+3.g1a2b3c4 for commits
# after it), else 0.0.0+git<date>.<commit> (a clone without tags). A
# "+dirty" suffix marks uncommitted changes. The result is a valid Debian
# version, and sorts in the order of the commits' dates.
set -eu
cd "$(dirname "$0")/.."
if [ -n "${LEASED_VERSION:-}" ]; then
  echo "$LEASED_VERSION"
  exit 0
fi
if ! git rev-parse --git-dir >/dev/null 2>&1; then
  echo "0.0.0+unknown"
  exit 0
fi
dirty=""
git diff --quiet HEAD -- 2>/dev/null || dirty=".dirty"
if d=$(git describe --tags --match 'v[0-9]*' 2>/dev/null); then
  # v1.2.0-3-g1a2b3c4 -> 1.2.0+3.g1a2b3c4
  echo "${d#v}$dirty" | sed -E 's/-([0-9]+)-(g[0-9a-f]+)/+\1.\2/'
else
  echo "0.0.0+git$(TZ=UTC git log -1 --format=%cd --date=format-local:%Y%m%d%H%M%S).$(git rev-parse --short=12 HEAD)$dirty"
fi
