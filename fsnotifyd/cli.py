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

Every verb that prints a result takes --json; exit codes are 0 ok, 1 failed, 2 usage or
config error (docs/cli.md).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import signal
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from .app import controlclient
from .app.output import FAILED, OK, USAGE, emit, error, json_flag, logs_to_stderr
from .config import Config, default_config_text, load_config
from .errors import ConfigError, RuleError, RuleErrors, UsageError
from .version import __version__

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
        return OK if st.get("ok") else FAILED
    if not st.get("ok"):
        print(f"fsnotifyd: {st.get('error', 'no answer from the daemon')}", file=sys.stderr)
        return FAILED
    version = st.get("version", "(version unknown)")
    # After an upgrade without a restart the daemon still runs the old code: say so.
    other = f" (this command is {__version__}: restart the daemon to run it)" if version != __version__ else ""
    print(f"fsnotifyd {version} pid {st['pid']}, up {st['uptime_s']} s{other}")
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


def _rule_error(e: RuleError) -> dict[str, Any]:
    return {"file": e.file, "line": e.line, "column": e.column, "field": e.field, "message": e.message,
            "expected": e.expected, "text": str(e)}


def cmd_rules_check(args: argparse.Namespace) -> int:
    from .rules.loader import check_paths

    errors = check_paths(args.paths)
    if not args.json:
        for e in errors:
            print(e, file=sys.stderr)
    if errors:
        print(f"fsnotifyd: {len(errors)} error(s) in {len(args.paths)} file(s)", file=sys.stderr)
    emit(args, {"ok": not errors, "files": args.paths, "errors": [_rule_error(e) for e in errors]},
         None if errors else f"{', '.join(args.paths)}: ok")
    return FAILED if errors else OK


def cmd_rules_test(args: argparse.Namespace) -> int:
    from .app import rulestest

    return rulestest.run(args.rules, args.events, expect=args.expect, fmt=args.format,
                         ve_map=args.ve_map, year=args.year, boot_time=args.boot_time, only_fired=args.only_fired,
                         show_progress=True)


def _boot_time(text: str) -> float:
    """argparse type: epoch seconds or RFC 3339; anything else is a usage error (2)."""
    if text.replace(".", "", 1).isdigit():
        return float(text)
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not epoch seconds or RFC 3339: {text!r}") from None


RELOAD_TIMEOUT_S = 60.0  # loading rules takes well under a second; past this the daemon is stuck


def cmd_rules_reload(args: argparse.Namespace) -> int:
    """Exit 0: the new rules are in force; 1: refused, the old rules stay (errors on stderr);
    2: no answer (not running, not allowed, stuck). ``systemctl reload`` runs this (ExecReload=),
    so it returns only once the daemon has finished the reload."""
    path = _socket_path(args)
    try:
        reply = asyncio.run(asyncio.wait_for(controlclient.ask(path, "reload"), RELOAD_TIMEOUT_S))
    except PermissionError as e:
        return _not_asked(args, f"not allowed to use the daemon's socket {path} ({e.strerror}): run as root or "
                                "as a member of the control group (config: control.group)")
    except (FileNotFoundError, ConnectionRefusedError) as e:
        return _not_asked(args, f"cannot reach the daemon at {path}: {e.strerror}. Is it running (fsnotifyd run)?")
    except TimeoutError:
        return _not_asked(args, f"the daemon at {path} did not answer within {RELOAD_TIMEOUT_S:.0f} s")
    except (OSError, ValueError) as e:  # reset, or no JSON line: the daemon went away mid-request
        return _not_asked(args, f"no answer from the daemon at {path}: {e}")
    if reply.get("ok"):
        emit(args, reply, f"rules reloaded: {reply['rules']} rules in force")
        return OK
    error(str(reply.get("error")))
    if "errors" not in reply:  # refused as a peer (permission), or the request failed: nothing was tried
        emit(args, {"asked": False, **reply})
        return USAGE
    if not args.json:
        for line in reply["errors"]:
            print(line, file=sys.stderr)
    emit(args, {"asked": True, **reply})
    return FAILED


def _not_asked(args: argparse.Namespace, message: str) -> int:
    error(message)
    emit(args, {"ok": False, "asked": False, "error": message})
    return USAGE


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "show":
        if args.json:
            raise UsageError("config show prints the YAML itself; --json is for config check")
        cfg = _config(args)
        if args.config is None:
            print(default_config_text(), end="")
        else:
            print(open(args.config, encoding="utf-8").read(), end="")
        return OK
    try:
        cfg = _config(args)
    except ConfigError as e:
        # A config error is 2 here as for every verb (it is what `run` would exit with).
        error(f"config error: {e}")
        emit(args, {"ok": False, "file": e.file or args.config, "errors": [_config_error(e)]})
        return USAGE
    problems = _host_problems(cfg, args.config)
    for line in problems:
        error(line)
    emit(args, {"ok": not problems, "file": cfg.file, "ves": len(cfg.ves), "errors": [
        {"file": cfg.file, "line": None, "field": None, "message": p, "text": p} for p in problems]},
        None if problems else f"{cfg.file}: ok ({len(cfg.ves)} VEs)")
    return USAGE if problems else OK


def _config_error(e: ConfigError) -> dict[str, Any]:
    return {"file": e.file, "line": e.line, "field": e.field, "message": str(e), "text": str(e)}


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
    if cfg.metrics_tls is not None and cfg.metrics_port is not None:
        from .metrics_endpoint import tls_context

        try:  # the context the daemon will build: a key that does not match its certificate shows here
            tls_context(cfg.metrics_tls)
        except OSError as e:
            problems.append(f"{cfg.file}: {e}")
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
    programs: dict[str, dict[str, Any]] = {}
    for name, prog in bpfload.PROGRAMS.items():
        try:
            loaded = bpfload.load(name, defs.get(name))
        except bpfload.ProbeUnavailable as e:
            programs[name] = {"ok": False, "about": prog.about, "reason": e.reason, "hint": e.hint}
            if not args.json:
                print(f"{name:<11} UNAVAILABLE  {e.reason}" + (f"\n{'':<13}hint: {e.hint}" if e.hint else ""))
            continue
        programs[name] = {"ok": True, "about": prog.about, "load_ms": round(loaded.load_seconds * 1000, 1)}
        if not args.json:
            print(f"{name:<11} ok  compile+attach {loaded.load_seconds * 1000:.0f} ms  ({prog.about})")
        loaded.close()
    ok = all(p["ok"] for p in programs.values())
    emit(args, {"ok": ok, "programs": programs})
    return OK if ok else FAILED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fsnotifyd", description=__doc__.splitlines()[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fsnotifyd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    json_flag(s)
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
    json_flag(rc)
    rc.set_defaults(func=cmd_rules_check)
    rt = rsub.add_parser("test", help="replay recorded events or kernel logs through rules",
                         description="LOG is an fsnotifyd JSONL journal/recording or kernel text from dmesg, "
                                     "dmesg -T, journalctl -k or journalctl -k -o short-precise.")
    rt.add_argument("rules", nargs="+", metavar="RULES")
    rt.add_argument("--events", nargs="+", required=True, metavar="LOG")
    rt.add_argument("--expect", metavar="FILE", help="expected decisions (JSON lines from --format json); "
                    "exit 1 with a diff when they differ")
    rt.add_argument("--format", choices=["table", "json"], default="table")
    rt.add_argument("--json", dest="format", action="store_const", const="json",
                    help="the same as --format json: one decision per line (JSON lines)")
    rt.add_argument("--only-fired", action="store_true",
                    help="list fired decisions only (suppressed ones are still counted): for long logs")
    rt.add_argument("--ve-map", metavar="FILE", help="device names to VEs for kernel text (YAML or JSON)")
    rt.add_argument("--year", type=int, help="year of journalctl lines (they carry none)")
    rt.add_argument("--boot-time", type=_boot_time,
                    help="boot time (epoch seconds or RFC 3339) for plain dmesg timestamps")
    rt.set_defaults(func=cmd_rules_test)
    rr = rsub.add_parser("reload", help="ask the running daemon to reload its rules (like SIGHUP)",
                         description="Returns once the daemon has reloaded. Exit 0: the new rules are in "
                                     "force; 1: they were refused and the old rules stay (the errors, as "
                                     "file:line:column, on stderr); 2: the daemon could not be asked.")
    common(rr)
    json_flag(rr)
    rr.set_defaults(func=cmd_rules_reload)

    bp = sub.add_parser("bpf", help="the BPF programs: print their C, or try loading them")
    bsub = bp.add_subparsers(dest="bpf_command", required=True)
    bs = bsub.add_parser("show", help="print the exact C the daemon loads (compat header and defines included)")
    bs.add_argument("programs", nargs="*", metavar="PROGRAM", help="ext4_error, space, alloc (default: all)")
    common(bs, socket=False)
    bs.set_defaults(func=cmd_bpf_show)
    bc = bsub.add_parser("check", help="compile and attach each program once; exit 1 if any cannot load")
    common(bc, socket=False)
    json_flag(bc)
    bc.set_defaults(func=cmd_bpf_check)

    from .app import imagecli

    imagecli.add_commands(sub)

    c = sub.add_parser("config", help="check or show the configuration")
    c.add_argument("action", choices=["check", "show"])
    common(c, socket=False)
    json_flag(c, "check: the result as one JSON document")
    c.set_defaults(func=cmd_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":  # the daemon sets up its own logging (--log-level)
        logs_to_stderr()
    try:
        return args.func(args)
    except ConfigError as e:
        return _failed(args, USAGE, f"config error: {e}")
    except UsageError as e:
        return _failed(args, USAGE, str(e))
    except RuleErrors as e:
        return _failed(args, USAGE, f"rules not valid, not starting:\n{e}",
                       errors=[_rule_error(x) for x in e.errors])
    except PermissionError as e:
        if e.filename is not None:  # a file named on the command line (connect() errors name none)
            return _failed(args, USAGE, f"{e.filename}: {e.strerror}")
        if args.command in ("status", "events", "record", "ve"):
            return _failed(args, FAILED, f"not allowed to use the daemon's socket ({e.strerror}): run as root or "
                                         "as a member of the control group (config: control.group)")
        raise
    except (FileNotFoundError, ConnectionRefusedError) as e:
        if e.filename is not None:  # a file named on the command line (connect() errors name none)
            return _failed(args, USAGE, f"{e.filename}: {e.strerror}")
        if args.command in ("status", "events", "record"):
            return _failed(args, FAILED, f"cannot reach the daemon at {_socket_path(args)}: {e.strerror}. "
                                         "Is it running (fsnotifyd run)?")
        raise


def _failed(args: argparse.Namespace, code: int, message: str, **fields: Any) -> int:
    """The message on stderr; with --json also ``{"ok": false, "error": ...}`` on stdout, so a
    script reading the JSON sees the failure rather than nothing."""
    error(message)
    emit(args, {"ok": False, "error": message, **fields})
    return code


if __name__ == "__main__":
    sys.exit(main())
