"""``fsnotifyd image ...`` and ``fsnotifyd ve ...``: the image manager and VEs from the shell.

Image commands take the image directory (its ``DiskDescriptor.xml`` and deltas); attachments
are recorded under ``<state-dir>/run`` so any later command (or ``detach`` after a crash) finds
them. VE commands work on the registry under ``<state-dir>/ves``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import FsnotifydError, ImageError, UsageError
from ..image import ops
from ..image.info import human, image_info, parse_size
from ..image.lock import exclusive
from .controlclient import ask_blocking
from .output import FAILED, OK, emit, json_flag
from .progress import Progress, reporter

if TYPE_CHECKING:  # imported where used, to keep the CLI's start-up short
    from ..image.attach import Attached
    from ..image.repack import Options as RepackOptions
    from ..ve.registry import VeRecord

DEFAULT_STATE_DIR = "/var/lib/fsnotifyd"


def _state_dir(args: argparse.Namespace) -> str:
    if args.state_dir:
        return args.state_dir
    if getattr(args, "config", None):
        from ..config import load_config

        return load_config(args.config).state_dir
    return DEFAULT_STATE_DIR


def _run_dir(args: argparse.Namespace) -> str:
    return os.path.join(_state_dir(args), "run")


def _attached(args: argparse.Namespace, image: str) -> Attached | None:
    from ..image import attach

    return attach.attachment(_run_dir(args), image)


def _need_attached(args: argparse.Namespace, image: str) -> Attached:
    a = _attached(args, image)
    if a is None:
        raise FsnotifydError(f"{image} is not attached (fsnotifyd image attach {image})")
    return a


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _size(text: str) -> int:
    """argparse type for sizes: a bad one is a usage error (exit 2), before anything is touched."""
    try:
        return parse_size(text)
    except ImageError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return v


def _attachment(a: Any) -> dict[str, Any]:
    return {"image": a.image, "loop": a.loop, "mountpoint": a.mountpoint, "pid": a.pid, "readonly": a.readonly}


# -- image commands ------------------------------------------------------------------------------

def cmd_create(args: argparse.Namespace) -> int:
    kw: dict[str, Any] = {"profile": args.profile, "fs": None if args.no_mkfs else "ext4"}
    if args.cluster:
        kw["cluster"] = args.cluster
    t0 = time.monotonic()
    desc = ops.create(args.image, args.size, **kw)
    seconds = time.monotonic() - t0
    emit(args, {"image": args.image, "size": desc.size, "cluster": desc.cluster,
                "fs": kw["fs"], "profile": args.profile, "seconds": round(seconds, 3)},
         f"{args.image}: {human(desc.size)} image, {human(desc.cluster)} clusters"
         f"{'' if args.no_mkfs else ', ext4 (' + args.profile + ' profile)'} in {seconds:.2f} s")
    return OK


def cmd_info(args: argparse.Namespace) -> int:
    info = image_info(args.image)
    a = _attached(args, args.image)
    if args.json:
        doc = info.to_dict() | {"attached": None if a is None else {"loop": a.loop, "mountpoint": a.mountpoint,
                                                                    "pid": a.pid, "readonly": a.readonly}}
        _print(doc | getattr(args, "ve_fields", {}), True)
        return 0
    print(f"image      {info.directory}")
    print(f"virtual    {human(info.size)} ({info.size} bytes), clusters of {human(info.cluster)}")
    print(f"allocated  {human(info.allocated_bytes)} ({100 * info.allocated_bytes / info.size:.1f} %)")
    print(f"files      {human(info.file_bytes)} long, {human(info.physical_bytes)} on disk")
    if a is not None:
        print(f"attached   {a.loop} (exporter pid {a.pid}){', mounted at ' + a.mountpoint if a.mountpoint else ''}"
              f"{', read-only' if a.readonly else ''}")
    for d in info.deltas:
        role = "top" if d.top else f"snapshot{' ' + repr(d.name) if d.name else ''}"
        print(f"  {d.guid}  {role:<20} {d.file:<50} {human(d.allocated_bytes):>8} allocated, "
              f"{human(d.physical_bytes):>8} on disk{', IN USE' if d.in_use else ''}"
              + (f", {d.zeroed_clusters} zero-marked" if d.zeroed_clusters else ""))
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    from ..image import attach

    a = attach.attach(args.image, run_dir=_run_dir(args), readonly=args.readonly, upto=args.snapshot)
    if args.mount:
        attach.mount(a, args.mount, readonly=args.readonly or bool(args.snapshot))
    emit(args, _attachment(a) | {"mountpoint": args.mount or a.mountpoint}, a.loop)
    return OK


def cmd_mount(args: argparse.Namespace) -> int:
    from ..image import attach

    a = _attached(args, args.image) or attach.attach(args.image, run_dir=_run_dir(args))
    attach.mount(a, args.mountpoint, readonly=args.readonly)
    emit(args, _attachment(a) | {"mountpoint": args.mountpoint, "readonly": args.readonly},
         f"{args.image} on {a.loop} mounted at {args.mountpoint}")
    return OK


def cmd_umount(args: argparse.Namespace) -> int:
    from ..image import attach

    a = _need_attached(args, args.image)
    attach.umount(a)
    emit(args, _attachment(a) | {"mountpoint": None})
    return OK


def cmd_detach(args: argparse.Namespace) -> int:
    from ..image import attach

    if args.snapshot:
        return _detach_view(args, args.snapshot)
    real = os.path.realpath(args.image)
    found = [a for a in attach.attached(_run_dir(args)) if os.path.realpath(a.image) == real]
    if not found:
        emit(args, {"image": args.image, "detached": []}, f"{args.image}: not attached")
        return OK
    for a in found:  # the image and any of its snapshots mounted for checks
        attach.detach(a, run_dir=_run_dir(args))
    emit(args, {"image": args.image, "detached": [_attachment(a) for a in found]})
    return OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    from ..image import attach
    from ..image.stack import Stack

    a = _attached(args, args.image)
    t0 = time.monotonic()
    if a is not None:
        guid = attach.snapshot(a, name=args.name)
    else:
        with exclusive(args.image, "snapshot"), Stack.open(args.image) as stack:
            guid = ops.snapshot(stack, args.image, name=args.name)
    ms = (time.monotonic() - t0) * 1000
    emit(args, {"image": args.image, "guid": guid, "name": args.name, "online": a is not None,
                "milliseconds": round(ms, 1)}, f"{guid} ({ms:.0f} ms)")
    return OK


def cmd_snapshots(args: argparse.Namespace) -> int:
    info = image_info(args.image)
    shots = [d for d in info.deltas if not d.top]
    if args.json:
        _print([{"guid": d.guid, "name": d.name, "created": d.created, "parent": d.parent,
                 "allocated_bytes": d.allocated_bytes} for d in shots], True)
        return 0
    for d in shots:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.created)) if d.created else "-"
        print(f"{d.guid}  {when}  {human(d.allocated_bytes):>8}  {d.name or ''}")
    return 0


def cmd_mount_snapshot(args: argparse.Namespace) -> int:
    from ..image import attach

    a = attach.attach(args.image, run_dir=_run_dir(args), readonly=True, upto=args.guid)
    attach.mount(a, args.mountpoint, readonly=True)
    emit(args, _attachment(a) | {"guid": args.guid, "mountpoint": args.mountpoint, "readonly": True},
         f"snapshot {args.guid} on {a.loop} mounted read-only at {args.mountpoint}")
    return OK


def _detach_view(args: argparse.Namespace, guid: str) -> int:
    """Take down one snapshot view (its mounts, loop device, exporter), leaving the image's
    own attachment, and a running VE on it, alone."""
    from ..image import attach

    a = attach.attachment(_run_dir(args), args.image, upto=guid)
    if a is None:
        emit(args, {"image": args.image, "guid": guid, "detached": False},
             f"{args.image}: snapshot {guid} is not attached")
        return OK
    attach.detach(a, run_dir=_run_dir(args))
    left = attach.leftovers(args.image, run_dir=_run_dir(args), upto=guid)
    if left:
        raise FsnotifydError(f"snapshot {guid} of {args.image} is not detached; still up: {'; '.join(left)}")
    emit(args, {"image": args.image, "guid": guid, "detached": True}, f"snapshot {guid} unmounted and detached")
    return OK


def cmd_umount_snapshot(args: argparse.Namespace) -> int:
    return _detach_view(args, args.guid)


def cmd_merge(args: argparse.Namespace) -> int:
    from ..image import attach

    a = _attached(args, args.image)
    if a is not None:
        r = attach.control(a, {"op": "merge", "guid": args.guid}, timeout=3600)
        if not r.get("ok"):
            raise FsnotifydError(f"merge failed: {r.get('error')}")
    else:
        with exclusive(args.image, "merge"), _line("merge", "clusters") as p:
            ops.merge(args.image, args.guid, progress=p)
    emit(args, {"image": args.image, "guid": args.guid, "merged": True, "online": a is not None},
         f"snapshot {args.guid} merged into its child and deleted")
    return OK


def cmd_grow(args: argparse.Namespace) -> int:
    from ..image import attach
    from ..image.stack import Stack

    size = args.size
    a = _attached(args, args.image)
    note = None
    if a is not None:
        online = attach.has_cap_sys_resource()
        attach.grow(a, size, resize_fs=online)
        if a.mountpoint and not online:
            note = ("disk grown online; growing a mounted ext4 needs CAP_SYS_RESOURCE, which this process lacks: "
                    "the filesystem grows at the next `fsnotifyd ve start` (or umount and resize2fs)")
        filesystem_grown = online and bool(a.mountpoint)
    else:
        with exclusive(args.image, "grow"), Stack.open(args.image) as stack:
            ops.grow_stack(stack, args.image, size)
        note = "disk grown; the filesystem grows at the next `fsnotifyd ve start` (or resize2fs on the device)"
        filesystem_grown = False
    emit(args, {"image": args.image, "size": size, "online": a is not None, "filesystem_grown": filesystem_grown,
                "note": note}, note)
    return OK


def cmd_shrink(args: argparse.Namespace) -> int:
    from ..image import attach, resize

    if args.online is not None:
        a = _need_attached(args, args.image)
        if not a.mountpoint:
            raise FsnotifydError("online shrink needs the image mounted")
        if args.online == 0:
            resize.deflate(a.mountpoint)
            emit(args, {"image": args.image, "mode": "balloon", "balloon": 0},
                 "balloon deflated: the VE has its space back")
            return OK
        r = resize.inflate(a.mountpoint, a.loop, args.online,
                           flush=lambda: attach.control(a, {"op": "flush"}, timeout=120))
        emit(args, {"image": args.image, "mode": "balloon", "balloon": r.size, "discarded": r.discarded,
                    "extents": r.extents},
             f"balloon of {human(r.size)}: {human(r.discarded)} given back to the host in {r.extents} extents")
        return OK
    if _attached(args, args.image) is not None:
        raise FsnotifydError("offline shrink needs the image detached (or use --online SIZE, the balloon)")
    a = attach.attach(args.image, run_dir=_run_dir(args))
    try:
        with _line("e2fsck", "") as p:
            new = resize.shrink_filesystem(a.loop, args.size, progress=p)
    finally:
        attach.detach(a, run_dir=_run_dir(args))
    with exclusive(args.image, "shrink"), _line("shrink", "clusters") as p:
        result = resize.cut_and_compact(args.image, new, progress=p)
    emit(args, {"image": args.image, "mode": "offline", "size": new, "released": result.released},
         f"filesystem and image cut to {human(new)}; {human(result.released)} released")
    return OK


def cmd_compact(args: argparse.Namespace) -> int:
    from ..image.stack import Stack

    a = _attached(args, args.image)
    t0 = time.monotonic()
    if a is not None:  # online, through its exporter (the VE's I/O waits meanwhile)
        from ..image import attach

        with _line("compact", "clusters") as p:
            r = attach.compact(a, progress=p)
        moved, released, online = r["moved"], r["released"], True
    else:
        with exclusive(args.image, "compact"), Stack.open(args.image) as stack, _line("compact", "clusters") as p:
            c = ops.compact(stack.top, progress=p)
        moved, released, online = c.moved, c.released, False
    seconds = time.monotonic() - t0
    emit(args, {"image": args.image, "moved": moved, "released": released, "online": online,
                "seconds": round(seconds, 3)},
         f"moved {moved} clusters, released {human(released)} in {seconds:.2f} s{' (online)' if online else ''}")
    return OK


def _repack_options(args: argparse.Namespace) -> RepackOptions:
    from ..image import repack
    from .logging import configure_logging

    configure_logging("info")  # log events to stderr: stdout is the result (--json)
    return repack.Options(dry_run=args.dry_run, budget_mib_s=args.budget_mib_s, max_seconds=args.max_seconds)


@contextlib.contextmanager
def _repack_progress() -> Iterator[Callable[[dict[str, Any]], None] | None]:
    """Repack's progress (a dict per step) on the one progress line (app/progress.py)."""
    with _line("repack", "clusters") as p:
        if p is None:
            yield None
            return
        line = p

        def show(d: dict[str, Any]) -> None:
            line.extra = lambda _s: f"{d['bytes_moved'] / (1 << 20):.1f} MiB moved, {d['mib_s']:.1f} MiB/s"
            line("", d["clusters_done"], d["clusters_total"])
        yield show


def _line(label: str, unit: str = "B") -> contextlib.AbstractContextManager[Progress | None]:
    """The progress line of one command, cleared when it ends (None off a terminal)."""
    return reporter(label, unit) or contextlib.nullcontext()


def _print_repack(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print(r, True)
        return
    if r.get("dry_run"):
        return  # the plan was printed
    b, a = r["before"], r["after"]
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(r["skipped"].items())) or "none"
    print(f"{r['clusters_freed']} clusters freed, {human(r['bytes_moved'])} moved in {r['moved_files']} files, "
          f"{r['seconds']:.1f} s; fragmentation {b['fragmentation']:.3f} -> {a['fragmentation']:.3f}, garbage "
          f"{b['garbage']:.3f} -> {a['garbage']:.3f}; {human(r['released'])} given back to the host")
    print(f"skipped: {skipped}")
    if "balloon" in r:
        print(f"filesystem limited to {human(r['size'])}: balloon of {human(r['balloon'])}, "
              f"{human(r['discarded'])} discarded")


def _repack_attachment(args: argparse.Namespace, a: Attached, what: str) -> int:
    from ..image import repack

    if not a.mountpoint or not os.path.ismount(a.mountpoint):
        raise FsnotifydError(f"{what} is attached but not mounted: repack moves data on the mounted filesystem")
    with _repack_progress() as progress:
        r = repack.run(a, _repack_options(args), progress=progress, printer=None if args.json else print)
    _print_repack(r, args.json)
    return 0


def cmd_repack(args: argparse.Namespace) -> int:
    return _repack_attachment(args, _need_attached(args, args.image), args.image)


def _running_ve(args: argparse.Namespace, verb: str) -> tuple[VeRecord, Attached]:
    from ..ve.registry import Registry

    rec = Registry(_state_dir(args)).get(args.id)
    a = _attached(args, rec.image)
    if not rec.running or a is None or not a.mountpoint or not os.path.ismount(a.mountpoint):
        raise FsnotifydError(f"VE {rec.id} is not running: {verb} works on a running VE's mounted filesystem "
                             f"(fsnotifyd ve start {rec.id}); nothing moved")
    return rec, a


def cmd_ve_repack(args: argparse.Namespace) -> int:
    rec, a = _running_ve(args, "repack")
    return _repack_attachment(args, a, f"VE {rec.id}")


def cmd_ve_shrink(args: argparse.Namespace) -> int:
    from ..image import repack

    if not args.online:
        raise UsageError("ve shrink works online only (--online); offline: fsnotifyd ve stop ID, then "
                         "fsnotifyd image shrink IMAGE SIZE")
    rec, a = _running_ve(args, "an online shrink")
    with _repack_progress() as progress:
        r = repack.shrink_online(a, args.to, _repack_options(args), progress=progress,
                                 printer=None if args.json else print)
    _print_repack(r, args.json)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ..image.check import check

    if args.repair and _attached(args, args.image) is not None:
        raise FsnotifydError("repair needs the image detached")
    if args.repair:
        with exclusive(args.image, "repair"), _line("image") as p:
            report = check(args.image, repair=True, progress=p)
    else:
        with _line("image") as p:
            report = check(args.image, progress=p)
    clean_after = report.clean or (args.repair and check(args.image).clean)
    emit(args, dataclasses.asdict(report) | {"clean": report.clean, "repair": args.repair, "ok": clean_after},
         str(report))
    return OK if clean_after else FAILED


def cmd_import(args: argparse.Namespace) -> int:
    from ..image import transfer

    if _attached(args, args.image) is not None:
        raise FsnotifydError(f"{args.image} is attached: detach it before replacing it")
    kw: dict[str, Any] = {"fmt": args.format, "force": args.force}
    if args.size:
        kw["size"] = args.size
    if args.cluster:
        kw["cluster"] = args.cluster
    t0 = time.monotonic()
    try:
        with _line("import") as p:
            r = transfer.import_disk(args.source, args.image, progress=p, **kw)
    except OSError as e:
        raise FsnotifydError(f"import of {args.source} into {args.image} failed: {e}") from e
    seconds = time.monotonic() - t0
    emit(args, dataclasses.asdict(r) | {"seconds": round(seconds, 3)},
         f"{r.directory}: {human(r.size)} image ({human(r.cluster)} clusters) from {r.format} {r.source}: "
         f"{human(r.data_bytes)} of data extents read, {r.clusters} clusters allocated, in {seconds:.2f} s")
    return OK


def cmd_export(args: argparse.Namespace) -> int:
    from ..image import transfer

    if not args.snapshot and _attached(args, args.image) is not None:
        raise FsnotifydError(f"{args.image} is attached and its top changes under the copy: detach it, or "
                             f"snapshot it and export the snapshot (--snapshot GUID)")
    t0 = time.monotonic()
    try:
        with _line("export") as p:
            r = transfer.export_disk(args.image, args.target, fmt=args.format or
                                     ("qcow2" if args.target.endswith(".qcow2") else "raw"), snapshot=args.snapshot,
                                     force=args.force, progress=p)
    except OSError as e:
        raise FsnotifydError(f"export of {args.image} to {args.target} failed: {e}") from e
    seconds = time.monotonic() - t0
    emit(args, dataclasses.asdict(r) | {"seconds": round(seconds, 3)},
         f"{r.target}: {r.format}, {human(r.size)} disk; {r.clusters} clusters read, "
         f"{human(r.written_bytes)} of data written (the rest holes), in {seconds:.2f} s")
    return OK


# -- VE commands ---------------------------------------------------------------------------------

def _labels(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"--label {item!r}: expected KEY=VALUE")
        out[k] = v
    return out


def cmd_ve_create(args: argparse.Namespace) -> int:
    from ..ve import lifecycle

    rec = lifecycle.create(_state_dir(args), args.id, args.size, mountpoint=args.mountpoint,
                           image=args.image, labels=_labels(args.label), profile=args.profile,
                           discard=not args.no_discard)
    if not args.json:
        print(f"VE {rec.id}: image {rec.image}, mount point {rec.mountpoint}")
    if args.start:
        rec = lifecycle.start(_state_dir(args), rec.id)
    emit(args, _ve(rec))
    return OK


def cmd_ve_list(args: argparse.Namespace) -> int:
    from ..ve.registry import Registry

    recs = Registry(_state_dir(args)).all()
    if args.json:
        _print([_ve(r) for r in recs], True)
        return 0
    for r in recs:
        labels = ",".join(f"{k}={v}" for k, v in sorted(r.labels.items()))
        print(f"{r.id:<12} {'running' if r.running else 'stopped':<8} {r.loop or '-':<12} {r.mountpoint}  {labels}"
              + (f"  ({r.reason})" if r.reason else ""))
    return 0


def cmd_ve_show(args: argparse.Namespace) -> int:
    from ..ve.registry import Registry

    rec = Registry(_state_dir(args)).get(args.id)
    args.image = rec.image
    if args.json:  # its image's info, as `image info --json`, with the VE's record under "ve"
        args.ve_fields = {"ve": _ve(rec)}
        return cmd_info(args)
    print(f"VE {rec.id}: {'running on ' + str(rec.loop) if rec.running else 'stopped'}")
    if rec.reason:
        print(f"reason      {rec.reason}")
    print(f"mount point {rec.mountpoint}; labels {rec.labels or '-'}; "
          f"online discard {'on' if rec.discard else 'off'}")
    return cmd_info(args)


def cmd_ve_set(args: argparse.Namespace) -> int:
    from ..ve.registry import Registry

    reg = Registry(_state_dir(args))
    with reg.ve_locked(args.id):
        rec = reg.get(args.id)
        if args.discard is not None:
            rec = reg.update(args.id, discard=args.discard == "on")
    emit(args, _ve(rec), f"VE {rec.id}: online discard {'on' if rec.discard else 'off'}"
         + (" (from the next start)" if rec.running else ""))
    return OK


def cmd_ve_start(args: argparse.Namespace) -> int:
    from ..ve import lifecycle

    with _line("ve start", "") as p:  # the image check and e2fsck: percentages
        rec = lifecycle.start(_state_dir(args), args.id, progress=p)
    emit(args, _ve(rec), f"VE {rec.id} running: {rec.loop} mounted at {rec.mountpoint}")
    return OK


def cmd_ve_stop(args: argparse.Namespace) -> int:
    from ..ve import lifecycle

    lifecycle.stop(_state_dir(args), args.id)
    emit(args, {"id": args.id, "running": False}, f"VE {args.id} stopped")
    return OK


def cmd_ve_release(args: argparse.Namespace) -> int:
    from ..actions import isolate
    from ..actions.executor import ActionError
    from ..actions.target import Targets
    from ..config import load_config

    cfg = load_config(getattr(args, "config", None))
    # Through the running daemon when there is one: it is root, so members of the control
    # group can release a VE without root, and the daemon's own view stays in step.
    socket_path = getattr(args, "socket", None) or cfg.socket
    if not args.state_dir and os.path.exists(socket_path):
        reply = ask_blocking(socket_path, {"op": "release", "ve": args.id})
        if reply is not None:
            if not reply.get("ok"):
                raise FsnotifydError(str(reply.get("error")))
            emit(args, {"id": args.id, "released": True, "mode": reply.get("mode"), "how": reply.get("how"),
                        "by_daemon": True},
                 f"VE {args.id} released from isolation ({reply.get('mode')}: {reply.get('how')}) by the daemon")
            return OK
    try:
        rec = isolate.release(Targets(_state_dir(args), cfg.ves), args.id)
    except ActionError as e:
        raise FsnotifydError(str(e)) from e
    emit(args, {"id": args.id, "released": True, "mode": rec.get("mode"), "how": rec.get("how"), "by_daemon": False},
         f"VE {args.id} released from isolation ({rec.get('mode')}: {rec.get('how')})")
    return OK


def cmd_ve_destroy(args: argparse.Namespace) -> int:
    from ..ve import lifecycle

    lifecycle.destroy(_state_dir(args), args.id, keep_image=args.keep_image)
    emit(args, {"id": args.id, "destroyed": True, "image_kept": args.keep_image},
         f"VE {args.id} destroyed{' (image kept)' if args.keep_image else ''}")
    return OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    def state(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--state-dir", help=f"where attachments and VEs are kept (default {DEFAULT_STATE_DIR}, "
                        "or the config's state_dir)")
        sp.add_argument("--config", help="YAML config to take state_dir from")

    im = sub.add_parser("image", help="ploop-style thin images: create, attach, snapshot, compact, check")
    isub = im.add_subparsers(dest="image_command", required=True, metavar="VERB")

    def cmd(name: str, func: Callable[[argparse.Namespace], int], help: str,
            image: bool = True) -> argparse.ArgumentParser:
        sp = isub.add_parser(name, help=help)
        if image:
            sp.add_argument("image", help="image directory (holds DiskDescriptor.xml)")
        state(sp)
        json_flag(sp)
        sp.set_defaults(func=run, image_func=func)
        return sp

    c = cmd("create", cmd_create, "a new image, formatted ext4")
    c.add_argument("--size", required=True, type=_size, help="virtual size: 10G, 512M, ...")
    c.add_argument("--cluster", type=_size, help="cluster size (default 1M)")
    c.add_argument("--profile", default="thin", choices=sorted(ops.MKFS_PROFILES),
                   help="mkfs.ext4 options: 'thin' keeps allocations compact (default), 'default' is mkfs's own")
    c.add_argument("--no-mkfs", action="store_true", help="leave the disk blank")
    cmd("info", cmd_info, "sizes, allocation and deltas")
    a = cmd("attach", cmd_attach, "start the exporter and a loop device (prints the device)")
    a.add_argument("--readonly", action="store_true")
    a.add_argument("--snapshot", metavar="GUID", help="attach a snapshot (read-only)")
    a.add_argument("--mount", metavar="DIR", help="also mount it there")
    m = cmd("mount", cmd_mount, "mount (attaching first if needed)")
    m.add_argument("mountpoint")
    m.add_argument("--readonly", action="store_true")
    cmd("umount", cmd_umount, "unmount (stays attached)")
    dt = cmd("detach", cmd_detach, "unmount, detach the loop, stop the exporter (also after a crash)")
    dt.add_argument("--snapshot", metavar="GUID", help="only this snapshot view (the image and its VE stay up)")
    s = cmd("snapshot", cmd_snapshot, "freeze, stack a new delta, thaw: O(1) in the image size")
    s.add_argument("--name")
    cmd("snapshots", cmd_snapshots, "list snapshots")
    ms = cmd("mount-snapshot", cmd_mount_snapshot, "mount a snapshot read-only (for checks)")
    ms.add_argument("guid")
    ms.add_argument("mountpoint")
    us = cmd("umount-snapshot", cmd_umount_snapshot,
             "unmount a snapshot view and detach it (the image and its VE stay up)")
    us.add_argument("guid")
    mg = cmd("merge", cmd_merge, "delete a snapshot, merging its data into the delta above")
    mg.add_argument("guid")
    g = cmd("grow", cmd_grow, "grow the disk (online: the filesystem too)")
    g.add_argument("size", type=_size)
    sh = cmd("shrink", cmd_shrink, "shrink: offline (resize2fs, cut, compact) or online with --online (balloon)")
    sh.add_argument("size", nargs="?", type=_size, help="offline: new filesystem size (default: as small as it goes)")
    sh.add_argument("--online", metavar="SIZE", type=_size, help="inflate the balloon to SIZE (0 deflates it)")
    cmd("compact", cmd_compact, "move clusters into holes and cut the file (detached)")

    def repack_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
        sp.add_argument("--budget-mib-s", type=_positive, metavar="N", help="move at most N MiB/s")
        sp.add_argument("--max-seconds", type=_positive, metavar="S", help="start no move after S seconds")

    rp_ = cmd("repack", cmd_repack, "move live data out of partly used clusters (attached and mounted)")
    repack_options(rp_)
    ck = cmd("check", cmd_check, "check the image's metadata (exit 1 on problems)")
    ck.add_argument("--repair", action="store_true")
    im_ = cmd("import", cmd_import, "a new image from a raw or qcow2 disk (sparse: only data is copied)",
              image=False)
    im_.add_argument("source", metavar="RAW|QCOW2", help="disk file (or block device) to bring in")
    im_.add_argument("image", metavar="DIR", help="image directory to create")
    im_.add_argument("--format", choices=("raw", "qcow2"), help="the source's format (default: from its header)")
    im_.add_argument("--size", type=_size, help="virtual size of the image (default: the disk's; never smaller)")
    im_.add_argument("--cluster", type=_size, help="cluster size (default 1M)")
    im_.add_argument("--force", action="store_true", help="replace an image already in DIR")
    ex = cmd("export", cmd_export, "write the image's disk to a sparse raw file or a qcow2")
    ex.add_argument("target", metavar="RAW|QCOW2", help="file to write")
    ex.add_argument("--format", choices=("raw", "qcow2"), default=None,
                    help="default: qcow2 if the name ends in .qcow2, else raw")
    ex.add_argument("--snapshot", metavar="GUID", help="export this snapshot's state (default: the current one)")
    ex.add_argument("--force", action="store_true", help="replace an existing file")

    ve = sub.add_parser("ve", help="VEs: an id paired with an image and a mount point")
    vsub = ve.add_subparsers(dest="ve_command", required=True, metavar="VERB")

    def vcmd(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = vsub.add_parser(name, help=help)
        state(sp)
        json_flag(sp)
        sp.set_defaults(func=run, image_func=func)
        return sp

    vc = vcmd("create", cmd_ve_create, "create a VE with a new image")
    vc.add_argument("id")
    vc.add_argument("--size", required=True, type=_size)
    vc.add_argument("--mountpoint", help="default <state-dir>/root/ID")
    vc.add_argument("--image", help="image directory (default <state-dir>/images/ID)")
    vc.add_argument("--label", action="append", metavar="KEY=VALUE")
    vc.add_argument("--profile", default="thin", choices=sorted(ops.MKFS_PROFILES))
    vc.add_argument("--start", action="store_true")
    vc.add_argument("--no-discard", action="store_true",
                    help="mount without online discard (space then comes back only by fstrim or a shrink)")
    vse = vcmd("set", cmd_ve_set, "change a VE's settings (taking effect at its next start)")
    vse.add_argument("id")
    vse.add_argument("--discard", choices=("on", "off"), help="mount with online discard (default on)")
    vcmd("list", cmd_ve_list, "list VEs")
    vs = vcmd("show", cmd_ve_show, "one VE and its image")
    vs.add_argument("id")
    vst = vcmd("start", cmd_ve_start, "check, attach and mount (also after a crash or reboot)")
    vst.add_argument("id")
    vsp = vcmd("stop", cmd_ve_stop, "unmount and detach")
    vsp.add_argument("id")
    vr = vcmd("release", cmd_ve_release, "undo an isolation (after a person has looked)")
    vr.add_argument("id")
    vrp = vcmd("repack", cmd_ve_repack, "move live data out of partly used clusters, online")
    vrp.add_argument("id")
    repack_options(vrp)
    vsh = vcmd("shrink", cmd_ve_shrink, "shrink a running VE to SIZE and give the space back (--online)")
    vsh.add_argument("id")
    vsh.add_argument("--to", required=True, metavar="SIZE", type=_size, help="new usable size: 1G, 512M, ...")
    vsh.add_argument("--online", action="store_true", help="repack the data above SIZE away, lay the balloon there")
    repack_options(vsh)
    vd = vcmd("destroy", cmd_ve_destroy, "stop and remove a VE (and its image)")
    vd.add_argument("id")
    vd.add_argument("--keep-image", action="store_true")


def _ve(r: Any) -> dict[str, Any]:
    return {"id": r.id, "image": r.image, "mountpoint": r.mountpoint, "running": r.running, "loop": r.loop,
            "labels": r.labels, "created": r.created, "reason": r.reason, "discard": r.discard}


def run(args: argparse.Namespace) -> int:
    """Image and VE errors (a bad image, a missing or existing VE, a failed mkfs) are one line
    and exit 1 (with --json also ``{"ok": false, "error": ...}`` on stdout); a usage error or a
    bad --config goes on to ``cli.main``, which exits 2."""
    if getattr(args, "config", None):
        from ..config import load_config

        load_config(args.config)  # a bad config is 2 whatever the verb, before anything is touched
    try:
        return args.image_func(args)
    except UsageError:
        raise
    except (FsnotifydError, OSError) as e:  # the registry's ConfigErrors too: "no VE '999'" is a failed lookup
        # An OSError here is the operation failing on the host (permission, a full disk), not a traceback.
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"fsnotifyd: {message}", file=sys.stderr)
        emit(args, {"ok": False, "error": message})
        return FAILED
