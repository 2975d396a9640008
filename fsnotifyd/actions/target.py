"""What an action acts on: a VE resolved to its mount, device, cgroup and (when the image
manager owns it) its image and attachment."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import FsnotifydError
from ..image import attach as att_mod
from ..inventory import VE
from ..ve.registry import Registry, VeRecord
from .executor import ActionError

CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class Target:
    id: str
    record: VeRecord | None  # the image manager's VE, None for a VE from the config
    mountpoint: str | None
    device: str | None  # /dev/...
    cgroup: str | None  # absolute path under the cgroup mount
    attachment: att_mod.Attached | None

    @property
    def managed(self) -> bool:
        return self.record is not None

    def need_image(self, action: str) -> att_mod.Attached | None:
        if self.record is None:
            raise ActionError(f"VE {self.id} is not managed by the image manager (it comes from the config): "
                              f"{action} needs an fsnotifyd image")
        return self.attachment

    def need_mount(self, action: str) -> str:
        if not self.mountpoint or not os.path.ismount(self.mountpoint):
            raise ActionError(f"VE {self.id}: {action} needs its filesystem mounted "
                              f"({self.mountpoint or 'no mount point known'})")
        return self.mountpoint


@dataclass
class Targets:
    """Resolves VE ids against the image manager's registry, then the config's VEs."""

    state_dir: str
    configured: Iterable[VE] = ()

    @property
    def run_dir(self) -> str:
        return os.path.join(self.state_dir, "run")

    def resolve(self, ve_id: str | None) -> Target:
        if not ve_id:
            raise ActionError("the decision names no VE: actions act on VEs")
        reg = Registry(self.state_dir)
        rec = None
        if os.path.exists(reg.path(ve_id)):
            try:
                rec = reg.get(ve_id)
            except FsnotifydError as e:
                raise ActionError(f"VE {ve_id}: {e}") from e
        if rec is not None:
            att = att_mod.attachment(self.run_dir, rec.image)
            return Target(ve_id, rec, rec.mountpoint, att.loop if att else None, None, att)
        for ve in self.configured:
            if ve.id == ve_id:
                dev = ve.devices[0] if ve.devices else None
                if dev and not dev.startswith("/") and ":" not in dev:
                    dev = "/dev/" + dev
                cg = ve.cgroup
                if cg and not cg.startswith("/sys/"):
                    cg = os.path.join(CGROUP_ROOT, cg.lstrip("/"))
                return Target(ve_id, None, ve.mounts[0] if ve.mounts else None, dev, cg, None)
        raise ActionError(f"unknown VE {ve_id!r}: neither in the image manager's registry nor in the config")
