"""Name → factory for every source; the name is also the config key under ``sources:``.

Factories import their module lazily, so a source whose library is missing (pyudev) degrades
alone instead of breaking the import of every other source.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import SOURCES, SourceConfig
from ..inventory import Inventory
from ..typing import Source

Factory = Callable[[SourceConfig, Inventory], Source]


def _kmsg(cfg: SourceConfig, inv: Inventory) -> Source:
    from .kmsg import KmsgSource

    return KmsgSource()


def _fanotify(cfg: SourceConfig, inv: Inventory) -> Source:
    from .fanotify import FanotifySource

    return FanotifySource(fstypes=cfg.fstypes or ("ext4",))


def _sysfs(cfg: SourceConfig, inv: Inventory) -> Source:
    from .sysfs import SysfsSource

    return SysfsSource(interval=cfg.interval or 1.0)


def _mountinfo(cfg: SourceConfig, inv: Inventory) -> Source:
    from .mounts import MountsSource

    return MountsSource(inventory=inv, interval=cfg.interval or 0.5)


def _udev(cfg: SourceConfig, inv: Inventory) -> Source:
    from .udev import UdevSource

    return UdevSource()


def _bpf_errors(cfg: SourceConfig, inv: Inventory) -> Source:
    from .bpf_errors import BpfErrorsSource

    return BpfErrorsSource()


def _bpf_space(cfg: SourceConfig, inv: Inventory) -> Source:
    from .bpf_space import BpfSpaceSource

    return BpfSpaceSource(inventory=inv, interval=cfg.interval or 1.0, ext4_devices=bool(cfg.ext4_devices))


def _bpf_alloc(cfg: SourceConfig, inv: Inventory) -> Source:
    from .bpf_alloc import BpfAllocSource

    return BpfAllocSource(inventory=inv, interval=cfg.interval or 10.0, region_mib=cfg.region_mib or 1,
                          figures_interval=60.0 if cfg.figures_interval is None else cfg.figures_interval)


def _quota(cfg: SourceConfig, inv: Inventory) -> Source:
    from .quota import QuotaSource

    return QuotaSource()


REGISTRY: dict[str, Factory] = {
    "kmsg": _kmsg,
    "fanotify": _fanotify,
    "sysfs": _sysfs,
    "mountinfo": _mountinfo,
    "udev": _udev,
    "bpf_errors": _bpf_errors,
    "bpf_space": _bpf_space,
    "bpf_alloc": _bpf_alloc,
    "quota": _quota,
}

if tuple(REGISTRY) != SOURCES:  # a source added in one place only: fail at import, not in production
    raise ImportError(f"sources/registry.py has {tuple(REGISTRY)} but config.SOURCES is {SOURCES}")
