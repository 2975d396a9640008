#!/usr/bin/env bash
# Install fsnotifyd the way operators run host daemons: a wheel in its own virtualenv under
# /opt/fsnotifyd, the CLI on PATH, the systemd unit, the config and rules under /etc/fsnotifyd,
# the docs and alerting assets under /usr/share/doc/fsnotifyd, shell completion and the man page
# under /usr/local/share. Idempotent; an existing config
# or rules file is never overwritten (the new one lands beside it as *.dist).
#
#   scripts/install.sh [--root DIR]
#
# --root DIR stages everything under DIR instead of / (for packaging, and for the tests): no
# group is created and systemd is not told.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=/
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=$2; shift 2 ;;
    *) echo "usage: $0 [--root DIR]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "install: run as root" >&2; exit 1; }
ROOT=${ROOT%/}
PREFIX=$ROOT/opt/fsnotifyd

# The Debian packages (bcc, e2fsprogs, fuse3, headers link) and the build venv.
scripts/bootstrap.sh

rm -rf build/wheel && mkdir -p build/wheel
.venv/bin/pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w build/wheel .
wheel=$(ls build/wheel/fsnotifyd-*.whl)

# Debian's python3 with its site-packages visible: bcc (python3-bpfcc) is only packaged there.
[ -x "$PREFIX/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$PREFIX"
# The runtime dependencies only, at the versions the tests ran with (the lock is the constraint).
"$PREFIX/bin/pip" install -q --disable-pip-version-check -c requirements.lock "$wheel"
"$PREFIX/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$wheel"

install -d -m 0755 "$ROOT/usr/local/sbin" "$ROOT/etc/systemd/system" "$ROOT/etc/fsnotifyd" \
  "$ROOT/etc/fsnotifyd/rules" "$ROOT/usr/share/doc/fsnotifyd"
ln -sfn /opt/fsnotifyd/bin/fsnotifyd "$ROOT/usr/local/sbin/fsnotifyd"
install -m 0644 packaging/fsnotifyd.service "$ROOT/etc/systemd/system/fsnotifyd.service"

# Shell completion (bash, zsh) and the man page, generated from the CLI's own parser by the
# build venv (shtab and argparse-manpage are build tools: the /opt venv does not get them).
# /usr/local/share beside /usr/local/sbin: bash-completion, zsh's fpath and man all look there.
rm -rf build/shelldocs
.venv/bin/python -m fsnotifyd.app.shelldocs --out build/shelldocs >/dev/null
install -D -m 0644 build/shelldocs/bash-completion/completions/fsnotifyd \
  "$ROOT/usr/local/share/bash-completion/completions/fsnotifyd"
install -D -m 0644 build/shelldocs/zsh/site-functions/_fsnotifyd "$ROOT/usr/local/share/zsh/site-functions/_fsnotifyd"
install -D -m 0644 build/shelldocs/man/man8/fsnotifyd.8 "$ROOT/usr/local/share/man/man8/fsnotifyd.8"

# Config and rules: root-owned and not writable by others, or the daemon refuses them.
keep_or_install() {  # SRC DEST
  if [ -e "$2" ] && ! cmp -s "$1" "$2"; then
    install -o root -g root -m 0644 "$1" "$2.dist"
    echo "install: kept your $2; the shipped version is $2.dist"
  else
    install -o root -g root -m 0644 "$1" "$2"
  fi
}
keep_or_install packaging/config.yaml "$ROOT/etc/fsnotifyd/config.yaml"
keep_or_install rules/default.yaml "$ROOT/etc/fsnotifyd/rules/default.yaml"

cp -r docs README.md "$ROOT/usr/share/doc/fsnotifyd/"
rm -rf "$ROOT/usr/share/doc/fsnotifyd/examples" "$ROOT/usr/share/doc/fsnotifyd/prometheus" \
  "$ROOT/usr/share/doc/fsnotifyd/grafana"
cp -r rules/examples "$ROOT/usr/share/doc/fsnotifyd/examples"
cp -r packaging/prometheus packaging/grafana "$ROOT/usr/share/doc/fsnotifyd/"

if [ "$ROOT" = "" ]; then
  # The control socket's group (config: control.group): its members may use fsnotifyd's CLI.
  getent group fsnotifyd >/dev/null || groupadd --system fsnotifyd
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "install: done. Start it with: systemctl enable --now fsnotifyd"
  else
    echo "install: done. systemd is not running here; start it with: /opt/fsnotifyd/bin/fsnotifyd run --config /etc/fsnotifyd/config.yaml"
  fi
else
  echo "install: staged under $ROOT"
fi
