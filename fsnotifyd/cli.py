"""fsnotifyd command line.

  fsnotifyd run [--config FILE] [--events-out PATH]     the daemon (root)
  fsnotifyd status [--json]                              sources up/down with reasons, VEs, counts
  fsnotifyd events tail [--kind K]... [--ve ID]...        live events as JSON lines
  fsnotifyd events log [--ve ID] [--since 1h] [--until T] incidents from the journal, step by step
  fsnotifyd record --out FILE [--duration S]             write the live stream to a file for replay
  fsnotifyd rules check PATH...                          validate rules files
  fsnotifyd rules test RULES... --events LOG...          replay recorded events/kernel logs through rules
  fsnotifyd rules reload                                 reload the running daemon's rules (or SIGHUP);
                                                         exit 1 when they are refused, 2 when not asked
  fsnotifyd config check|show [--config FILE]            validate / print the effective config
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import signal
import sys
import time
from datetime import datetime
from typing import Any, Sequence, TextIO

from .app import controlclient
from .config import Config, default_config_text, load_config
from .errors import ConfigError, RuleErrors

EXAMPLES = """examples:
  fsnotifyd run                                   # embedded default config
  fsnotifyd run --config /etc/fsnotifyd/config.yaml --events-out /tmp/ev.jsonl
  fsnotifyd events tail --kind fs.error --kind fs.readonly --ve 101
  fsnotifyd record --out incident.jsonl --duration 600
"""


def _config(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def _socket_path(args: argparse.Namespace) -> str:
    return args.socket or _config(args).socket


def cmd_run(args: argparse.Namespace) -> int:
    from .app.daemon import Daemon
    from .app.logging import configure_logging

    from .app.sdnotify import Notifier
    from .trust import require_root_only

    configure_logging(args.log_level)
    if args.config is not None:
        require_root_only(args.config, "config file")  # before reading it: its rules path is trusted too
    cfg = _config(args)
    notifier = Notifier()  # takes NOTIFY_SOCKET out of the environment children inherit
    # `kill -USR1 <pid>` prints every thread's stack to stderr: a hung daemon explains itself.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        daemon = Daemon(cfg, events_out=args.events_out, notifier=notifier)
        loop.add_signal_handler(signal.SIGHUP, daemon.control.reload_rules)
        await daemon.run(stop)

    asyncio.run(main())
    return 0


def _ask(args: argparse.Namespace, op: str) -> dict[str, Any]:
    """One request to the daemon, one reply."""
    return asyncio.run(controlclient.ask(_socket_path(args), op))


def cmd_status(args: argparse.Namespace) -> int:
    st = _ask(args, "status")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0 if st.get("ok") else 1
    if not st.get("ok"):
        print(f"fsnotifyd: {st.get('error', 'no answer from the daemon')}", file=sys.stderr)
        return 1
    print(f"fsnotifyd pid {st['pid']}, up {st['uptime_s']} s")
    print("sources:")
    for name, s in st["sources"].items():
        state = "up" if s["up"] else "DOWN"
        why = f"  ({s['reason']}{'; hint: ' + s['hint'] if s.get('hint') else ''})" if not s["up"] else ""
        print(f"  {name:10} {state:5} observations={s['observations']}{why}")
    print("VEs:" if st["ves"] else "VEs: none configured")
    for ve in st["ves"]:
        print(f"  {ve['id']}: mounts={ve['mounts']} devices={ve['devices']} images={ve['images']}")
    images = st.get("images") or {}
    for im in images.get("attached") or []:
        health = "healthy" if im["healthy"] else f"UNHEALTHY ({im.get('error') or 'see its log'})"
        io = im.get("stats") or {}
        path = f", data path {im['data_path']}" if im.get("data_path") else ""
        print(f"  image {im['image']} on {im['loop']} (exporter {im['pid']}): {health}, "
              f"{io.get('writes', 0)} writes, {io.get('reads', 0)} reads, {im.get('errors') or 0} I/O errors{path}")
    if images.get("exporters_aborted"):
        print(f"  watchdog aborted {images['exporters_aborted']} hung exporter(s)")
    for name, sk in (st.get("sinks") or {}).items():
        line = (f"sink {name}: {sk.get('spooled_events', 0)} spooled, {sk.get('delivered', 0)} delivered, "
                f"{sk.get('rejected', 0)} rejected")
        if sk.get("memory_events") or sk.get("spool_failing"):
            line += (f", {sk.get('memory_events', 0)} held in memory"
                     + (f" (spool cannot be written: {sk.get('spool_errno')})" if sk.get("spool_failing") else ""))
        print(f"{line}; last error: {sk['last_error']}" if sk.get("last_error") else line)
    _print_files(st.get("files") or {})
    print("events:", ", ".join(f"{k}={v}" for k, v in sorted(st["events"].items())) or "none yet")
    rules = st.get("rules") or {}
    if rules:
        print(f"rules: {rules['rules']} in force from {', '.join(rules['files'])}; fired {rules['fired']}, "
              f"suppressed {rules['suppressed_threshold']} by threshold, {rules['suppressed_cooldown']} by cooldown")
        for err in rules.get("last_reload_error") or []:
            print(f"  last reload FAILED (old rules kept): {err}")
    actions = st.get("actions") or {}
    if actions.get("enabled"):
        print(f"actions: {actions['unfinished']} unfinished")
        for j in (actions.get("recent") or [])[-5:]:
            print(f"  {j['id']}: {j['action']} on VE {j['ve'] or '-'} {j['state']}"
                  + (f" ({j['error']})" if j.get("error") else ""))
    elif actions:
        print("actions: disabled (decisions are only published)")
    return 0


def _print_files(files: dict[str, dict[str, Any]]) -> None:
    """The daemon's own files (state, journals): only those the disk refuses get a line each."""
    failing = {p: f for p, f in files.items() if not f.get("ok", True)}
    if not failing:
        print(f"own files: all {len(files)} written")
        return
    print(f"own files: {len(failing)} of {len(files)} cannot be written "
          "(kept in memory, written again once the disk takes them)")
    for path, f in sorted(failing.items()):
        since = f" for {time.time() - f['since']:.0f} s" if f.get("since") else ""
        print(f"  {path}: {f.get('errno')} ({f.get('error')}){since}, {f.get('refused', 0)} writes refused")


async def _stream(args: argparse.Namespace, out: TextIO, duration: float | None) -> int:
    req = {"op": "tail", "kinds": args.kind or [], "ves": args.ve or []}
    return await controlclient.stream(_socket_path(args), req, out, duration)


def cmd_tail(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_stream(args, sys.stdout, None))
    except KeyboardInterrupt:
        return 0


def cmd_record(args: argparse.Namespace) -> int:
    with open(args.out, "a", encoding="utf-8") as out:
        try:
            return asyncio.run(_stream(args, out, args.duration))
        except KeyboardInterrupt:
            return 0


def cmd_rules_check(args: argparse.Namespace) -> int:
    from .rules.loader import check_paths

    errors = check_paths(args.paths)
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        print(f"fsnotifyd: {len(errors)} error(s) in {len(args.paths)} file(s)", file=sys.stderr)
        return 1
    print(f"{', '.join(args.paths)}: ok")
    return 0


def cmd_rules_test(args: argparse.Namespace) -> int:
    from .app import rulestest

    boot = None
    if args.boot_time:
        boot = float(args.boot_time) if args.boot_time.replace(".", "", 1).isdigit() else \
            datetime.fromisoformat(args.boot_time.replace("Z", "+00:00")).timestamp()
    return rulestest.run(args.rules, args.events, expect=args.expect, fmt=args.format,
                         ve_map=args.ve_map, year=args.year, boot_time=boot, only_fired=args.only_fired,
                         show_progress=True)


RELOAD_TIMEOUT_S = 60.0  # loading rules takes well under a second; past this the daemon is stuck


def cmd_rules_reload(args: argparse.Namespace) -> int:
    """Exit 0: the new rules are in force; 1: refused, the old rules stay (errors on stderr);
    2: no answer (not running, not allowed, stuck). ``systemctl reload`` runs this (ExecReload=),
    so it returns only once the daemon has finished the reload."""
    path = _socket_path(args)
    try:
        reply = asyncio.run(asyncio.wait_for(controlclient.ask(path, "reload"), RELOAD_TIMEOUT_S))
    except PermissionError as e:
        print(f"fsnotifyd: not allowed to use the daemon's socket {path} ({e.strerror}): run as root or as a "
              "member of the control group (config: control.group)", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConnectionRefusedError) as e:
        print(f"fsnotifyd: cannot reach the daemon at {path}: {e.strerror}. Is it running (fsnotifyd run)?",
              file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"fsnotifyd: the daemon at {path} did not answer within {RELOAD_TIMEOUT_S:.0f} s", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # reset, or no JSON line: the daemon went away mid-request
        print(f"fsnotifyd: no answer from the daemon at {path}: {e}", file=sys.stderr)
        return 2
    if reply.get("ok"):
        print(f"rules reloaded: {reply['rules']} rules in force")
        return 0
    print(f"fsnotifyd: {reply.get('error')}", file=sys.stderr)
    if "errors" not in reply:
        return 2  # refused as a peer (permission), or the request failed: nothing was tried
    for e in reply["errors"]:
        print(e, file=sys.stderr)
    return 1


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.action == "show":
        if args.config is None:
            print(default_config_text(), end="")
        else:
            print(open(args.config, encoding="utf-8").read(), end="")
    else:
        problems = _host_problems(cfg, args.config)
        for line in problems:
            print(f"fsnotifyd: {line}", file=sys.stderr)
        if problems:
            return 2
        print(f"{cfg.file}: ok ({len(cfg.ves)} VEs)")
    return 0


def _host_problems(cfg: Config, path: str | None) -> list[str]:
    """What `run` would refuse on this host that the file's text alone cannot show."""
    import os

    from .trust import untrusted_reason

    problems = []
    if os.geteuid() == 0:
        for what, p in [("config file", path), *(("rules file", r) for r in cfg.rules or ())]:
            if p is not None and (reason := untrusted_reason(p)) is not None:
                problems.append(f"{p}: the daemon would refuse this {what}: {reason}")
    for i, hook in enumerate(cfg.webhooks):
        for key in ("token_file", "ca_file"):
            f = getattr(hook, key)
            if f is not None and not os.access(f, os.R_OK):
                problems.append(f"{cfg.file}: sinks.webhooks[{i}].{key}: cannot read {f}")
    return problems


def _bpf_defines(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    from .sources.bpf_alloc import defines
    from .sources.bpf_space import space_defines

    cfg = _config(args)
    alloc = cfg.sources.get("bpf_alloc")
    space = cfg.sources.get("bpf_space")
    return {"alloc": defines(((alloc.region_mib if alloc else None) or 1) << 20),
            "space": space_defines(bool(space and space.ext4_devices))}


def cmd_bpf_show(args: argparse.Namespace) -> int:
    from .sources import bpfload

    names = args.programs or list(bpfload.PROGRAMS)
    unknown = [n for n in names if n not in bpfload.PROGRAMS]
    if unknown:
        print(f"fsnotifyd: no BPF program {', '.join(unknown)}; there are {', '.join(bpfload.PROGRAMS)}",
              file=sys.stderr)
        return 2
    defs = _bpf_defines(args)
    for name in names:
        sys.stdout.write(bpfload.program_text(name, defs.get(name)))
    return 0


def cmd_bpf_check(args: argparse.Namespace) -> int:
    """Compile and attach every program once, as the daemon would; report time or reason."""
    from .sources import bpfload

    defs = _bpf_defines(args)
    failed = 0
    for name, prog in bpfload.PROGRAMS.items():
        try:
            loaded = bpfload.load(name, defs.get(name))
        except bpfload.ProbeUnavailable as e:
            failed += 1
            print(f"{name:<11} UNAVAILABLE  {e.reason}" + (f"\n{'':<13}hint: {e.hint}" if e.hint else ""))
            continue
        print(f"{name:<11} ok  compile+attach {loaded.load_seconds * 1000:.0f} ms  ({prog.about})")
        loaded.close()
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fsnotifyd", description=__doc__.splitlines()[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, socket: bool = True) -> None:
        sp.add_argument("--config", help="YAML config (default: the embedded one)")
        if socket:
            sp.add_argument("--socket", help="daemon socket (default: from the config)")

    r = sub.add_parser("run", help="run the daemon")
    common(r, socket=False)
    r.add_argument("--events-out", metavar="PATH", help="also append every event to PATH (JSONL)")
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="sources, VEs and counts of the running daemon")
    common(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    e = sub.add_parser("events", help="event streams")
    esub = e.add_subparsers(dest="events_command", required=True)
    t = esub.add_parser("tail", help="print live events as JSON lines")
    common(t)
    t.add_argument("--kind", action="append", help="only this kind (repeatable; 'fs.*' matches a prefix)")
    t.add_argument("--ve", action="append", help="only events of this VE (repeatable)")
    t.set_defaults(func=cmd_tail)
    from .app import eventslog

    eventslog.add_command(esub, common)

    rec = sub.add_parser("record", help="write the live event stream to a file for later replay")
    common(rec)
    rec.add_argument("--out", required=True)
    rec.add_argument("--duration", type=float, help="seconds (default: until interrupted)")
    rec.add_argument("--kind", action="append")
    rec.add_argument("--ve", action="append")
    rec.set_defaults(func=cmd_record)

    ru = sub.add_parser("rules", help="check, test and reload remediation rules")
    rsub = ru.add_subparsers(dest="rules_command", required=True)
    rc = rsub.add_parser("check", help="validate rules files (exit 1 on any error)")
    rc.add_argument("paths", nargs="+", metavar="PATH")
    rc.set_defaults(func=cmd_rules_check)
    rt = rsub.add_parser("test", help="replay recorded events or kernel logs through rules",
                         description="LOG is an fsnotifyd JSONL journal/recording or kernel text from dmesg, "
                                     "dmesg -T, journalctl -k or journalctl -k -o short-precise.")
    rt.add_argument("rules", nargs="+", metavar="RULES")
    rt.add_argument("--events", nargs="+", required=True, metavar="LOG")
    rt.add_argument("--expect", metavar="FILE", help="expected decisions (JSON lines from --format json); "
                    "exit 1 with a diff when they differ")
    rt.add_argument("--format", choices=["table", "json"], default="table")
    rt.add_argument("--only-fired", action="store_true",
                    help="list fired decisions only (suppressed ones are still counted): for long logs")
    rt.add_argument("--ve-map", metavar="FILE", help="device names to VEs for kernel text (YAML or JSON)")
    rt.add_argument("--year", type=int, help="year of journalctl lines (they carry none)")
    rt.add_argument("--boot-time", help="boot time (epoch seconds or RFC 3339) for plain dmesg timestamps")
    rt.set_defaults(func=cmd_rules_test)
    rr = rsub.add_parser("reload", help="ask the running daemon to reload its rules (like SIGHUP)",
                         description="Returns once the daemon has reloaded. Exit 0: the new rules are in "
                                     "force; 1: they were refused and the old rules stay (the errors, as "
                                     "file:line:column, on stderr); 2: the daemon could not be asked.")
    common(rr)
    rr.set_defaults(func=cmd_rules_reload)

    bp = sub.add_parser("bpf", help="the BPF programs: print their C, or try loading them")
    bsub = bp.add_subparsers(dest="bpf_command", required=True)
    bs = bsub.add_parser("show", help="print the exact C the daemon loads (compat header and defines included)")
    bs.add_argument("programs", nargs="*", metavar="PROGRAM", help="ext4_error, space, alloc (default: all)")
    common(bs, socket=False)
    bs.set_defaults(func=cmd_bpf_show)
    bc = bsub.add_parser("check", help="compile and attach each program once; exit 1 if any cannot load")
    common(bc, socket=False)
    bc.set_defaults(func=cmd_bpf_check)

    from .app import imagecli

    imagecli.add_commands(sub)

    c = sub.add_parser("config", help="check or show the configuration")
    c.add_argument("action", choices=["check", "show"])
    common(c, socket=False)
    c.set_defaults(func=cmd_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"fsnotifyd: config error: {e}", file=sys.stderr)
        return 2
    except RuleErrors as e:
        print(f"fsnotifyd: rules not valid, not starting:\n{e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        if args.command in ("status", "events", "record", "ve"):
            print(f"fsnotifyd: not allowed to use the daemon's socket ({e.strerror}): run as root or as a "
                  "member of the control group (config: control.group)", file=sys.stderr)
            return 1
        raise
    except (FileNotFoundError, ConnectionRefusedError) as e:
        if args.command in ("status", "events", "record"):
            print(f"fsnotifyd: cannot reach the daemon at {_socket_path(args)}: {e.strerror}. "
                  "Is it running (fsnotifyd run)?", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
