#!/usr/bin/env bash
# Remove what scripts/install.sh installed. The config (/etc/fsnotifyd) stays unless --purge;
# the state directory (/var/lib/fsnotifyd: the VE registry, images' run state, webhook spools)
# is never removed here, since VEs may still use it: remove it yourself once they are gone.
#
#   scripts/uninstall.sh [--root DIR] [--purge]
set -euo pipefail
ROOT=/
PURGE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=$2; shift 2 ;;
    --purge) PURGE=1; shift ;;
    *) echo "usage: $0 [--root DIR] [--purge]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "uninstall: run as root" >&2; exit 1; }
ROOT=${ROOT%/}

if [ "$ROOT" = "" ] && [ -d /run/systemd/system ]; then
  systemctl disable --now fsnotifyd.service 2>/dev/null || true
fi
rm -f "$ROOT/etc/systemd/system/fsnotifyd.service"
if [ "$ROOT" = "" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
if [ -L "$ROOT/usr/local/sbin/fsnotifyd" ]; then rm -f "$ROOT/usr/local/sbin/fsnotifyd"; fi
rm -rf "$ROOT/opt/fsnotifyd" "$ROOT/usr/share/doc/fsnotifyd"
rm -f "$ROOT/usr/local/share/bash-completion/completions/fsnotifyd" "$ROOT/usr/local/share/zsh/site-functions/_fsnotifyd" \
  "$ROOT/usr/local/share/man/man8/fsnotifyd.8"
if [ "$PURGE" -eq 1 ]; then
  rm -rf "$ROOT/etc/fsnotifyd"
  if [ "$ROOT" = "" ] && getent group fsnotifyd >/dev/null; then groupdel fsnotifyd || true; fi
  echo "uninstall: removed, config purged"
else
  echo "uninstall: removed; kept $ROOT/etc/fsnotifyd (--purge removes it)"
fi
state="$ROOT/var/lib/fsnotifyd"
[ -d "$state" ] && echo "uninstall: the state directory $state is kept (VE registry, spools); remove it when no VE uses it"
exit 0
