#!/usr/bin/env bash
# Bring a fresh Debian 12 machine to the state fsnotifyd needs; idempotent, safe to re-run.
# Installs only what is missing, so a prepared machine pays a few dpkg queries, not an apt run.
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc, libc6-dev and python3-dev build the C parts of the rules replay (setup.py); fio drives
# the image I/O benchmark (bench/image_io.py); systemd gives systemd-analyze, openssl the TLS tools,
# qemu-utils the qemu-img that `image import/export` uses for qcow2.
DEB_PACKAGES=(e2fsprogs fuse3 python3-venv python3-bpfcc linux-headers-amd64 util-linux gcc libc6-dev python3-dev fio
              systemd openssl qemu-utils)
DEB_PACKAGES+=(zsh)  # the test that loads the generated zsh completion (tests/unit/test_shelldocs.py)
# XFS and btrfs: their mkfs, xfs_db (corrupting test images), xfs_repair and btrfs check (fsck).
DEB_PACKAGES+=(xfsprogs btrfs-progs)
install_missing() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing Debian packages ${missing[*]} and not root; run as root" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
install_missing "${DEB_PACKAGES[@]}"

# The browser that opens the `events log --format html` page in its test
# (tests/integration/test_events_log.py: a headless screenshot must show the lanes). Heavy, so
# a block of its own: Debian 12's chromium 156 with its 24 dependencies is about 113 MB to
# download, ~350 MB installed (about 10 s on this VM's mirror).
BROWSER_PACKAGES=(chromium)
install_missing "${BROWSER_PACKAGES[@]}"

# bcc needs headers at /lib/modules/$(uname -r)/build. This kernel ships none, so point it at
# Debian's generic -amd64 headers (verified to compile the probes; see docs/troubleshooting.md).
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build" ] && [ "$(id -u)" -eq 0 ]; then
  amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)
  if [ -n "$amd64" ]; then
    mkdir -p "$kdir"
    ln -sfn "$amd64" "$kdir/build"
    [ -n "$common" ] && ln -sfn "$common" "$kdir/source"
    echo "bootstrap: linked $kdir/build -> $amd64"
  fi
fi

# The virtualenv uses Debian's python3 because bcc (python3-bpfcc) is built for it.
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ] || ! cmp -s requirements.lock .venv/.requirements.lock; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.lock
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  cp requirements.lock .venv/.requirements.lock
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$site/bcc" ]; then
  ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi

# promtool checks packaging/prometheus (tests/unit/test_alerting_assets.py). It comes from Debian's
# prometheus package, unpacked under .cache/ rather than installed: installing the package would
# start a Prometheus server. Without it the bootstrap goes on; the test skips (fails in CI) and says why.
promtool=.cache/prometheus/usr/bin/promtool
if [ ! -x "$promtool" ]; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download -qq prometheus) >"$tmp/log" 2>&1 \
     || { [ "$(id -u)" -eq 0 ] && apt-get update -qq && (cd "$tmp" && apt-get download -qq prometheus) >"$tmp/log" 2>&1; }; then
    mkdir -p .cache && rm -rf .cache/prometheus .cache/prometheus.new
    dpkg-deb -x "$tmp"/prometheus_*.deb .cache/prometheus.new
    mv .cache/prometheus.new .cache/prometheus
    echo "bootstrap: unpacked promtool into .cache/prometheus"
  else
    echo "bootstrap: could not download Debian's prometheus package for promtool:" >&2
    cat "$tmp/log" >&2
  fi
  rm -rf "$tmp"
fi
if [ -x "$promtool" ] && [ "$(readlink .venv/bin/promtool)" != "../../$promtool" ]; then
  ln -sfn "../../$promtool" .venv/bin/promtool
fi

# The C extensions (rules engine core, journal scanner) are built in place, again whenever a
# C source is newer than its build. Without them everything still works, at half the speed
# (tests/unit/test_rules_core.py fails then, so a broken build is not missed).
# Built aside and renamed into place: a running exporter has _fastio mapped, and writing over
# the file it maps would crash it.
for src in fsnotifyd/rules/_decide.c fsnotifyd/replay/_jsonl.c fsnotifyd/image/_fastio.c; do
  so=$(ls "${src%.c}".cpython-*.so 2>/dev/null | head -n1 || true)
  if [ -z "$so" ] || [ "$src" -nt "$so" ] || [ setup.py -nt "$so" ]; then
    echo "bootstrap: building C extensions"
    rm -rf build/ext
    .venv/bin/python setup.py -q build_ext --build-lib build/ext --build-temp build/ext-tmp
    (cd build/ext && find fsnotifyd -name '*.so') | while read -r built; do
      cp "build/ext/$built" "$built.new" && mv -f "$built.new" "$built"
    done
    break
  fi
done
