"""The replay's VE map: which device belongs to which VE, from a small YAML or JSON file.

Read with the one positioned-YAML reader (:mod:`fsnotifyd.yamlpos`); errors are
:class:`~fsnotifyd.errors.ConfigError` naming file, line and field.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError
from ..inventory import VE, validate_ve_id
from ..yamlpos import Value, YamlSyntaxError, compose, value_of, value_of_json

__all__ = ["load_ve_map"]

_FIELDS = {"devices": "devices", "device": "devices", "mounts": "mounts", "mount": "mounts",
           "images": "images", "image": "images", "labels": "labels", "cgroup": "cgroup"}


def load_ve_map(path: str | os.PathLike[str]) -> tuple[VE, ...]:
    """VEs from a small YAML or JSON map file, in either of two shapes (mixable)::

        {"101": {"devices": ["loop0"], "mounts": ["/vz/root/101"], "images": [...],
                 "labels": {"tier": "gold"}, "cgroup": "..."}}
        {"loop0": "101", "loop1": "102"}          # device → VE id

    A key whose value is a mapping is a VE id; a key whose value is a string is a device.
    ``device``, ``mount`` and ``image`` are accepted for their plurals, and each takes one
    string or a list. Errors are :class:`~fsnotifyd.errors.ConfigError` naming file and line.
    """
    file = os.fspath(path)
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read VE map: {e.strerror or e}", file=file) from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"VE map is not UTF-8 text: {e.reason}", file=file) from e
    root: Value | None
    try:
        node = compose(text)
        root = None if node is None else value_of(node)
    except YamlSyntaxError as e:
        # JSON that PyYAML's YAML 1.1 reader refuses (tabs, "\\/") is still JSON.
        try:
            root = value_of_json(text)
        except ValueError:
            line = e.line if e.why == "syntax" else None
            raise ConfigError(f"VE map is neither YAML nor JSON: {e.problem or e.text}", file=file,
                              line=line) from None
    return _ves_from(root, file)


def _ves_from(root: Value | None, file: str) -> tuple[VE, ...]:
    def err(msg: str, n: Value, field: str | None = None) -> ConfigError:
        return ConfigError(msg, file=file, line=n.line, field=field)

    if root is None or root.kind == "null":
        return ()
    if root.kind != "map":
        raise err("a VE map is a mapping: {VE id: {devices: [...]}} or {device: VE id}", root)
    found: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}  # device → VE id
    keys_seen: set[str] = set()

    def entry_of(ve: str) -> dict[str, Any]:
        return found.setdefault(ve, {"devices": [], "mounts": [], "images": [], "labels": {}, "cgroup": None})

    def ve_id(n: Value, field: str) -> str:
        try:
            return validate_ve_id(n.value)
        except ConfigError as e:
            raise ConfigError(str(e).split(" (field")[0], file=file, line=n.line, field=field) from None

    def strings(n: Value, field: str) -> list[Value]:
        items = n.value if n.kind == "seq" else [n]
        for item in items:
            if item.kind != "str" or not item.value:
                raise err("expected a non-empty string or a list of them", item, field)
        return items

    def claim(device: str, ve: str, n: Value) -> None:
        prior = owner.setdefault(device, ve)
        if prior != ve:
            raise err(f"device {device!r} is given to VE {prior!r} and to VE {ve!r}", n, device)

    for k, v in root.value:
        if k.kind != "str":
            raise err("keys are VE ids or device names (strings)", k)
        if k.value in keys_seen:
            raise err(f"duplicate key {k.value!r}", k, k.value)
        keys_seen.add(k.value)
        if v.kind == "str":  # {"loop0": "101"}
            ve = ve_id(v, k.value)
            claim(k.value, ve, v)
            entry_of(ve)["devices"].append(k.value)
            continue
        if v.kind != "map":
            raise err(f"{k.value!r}: expected a VE id (device map) or a mapping of devices, mounts, "
                      "images, labels (VE map)", v, k.value)
        ve = ve_id(k, k.value)
        entry = entry_of(ve)
        for fk, fv in v.value:
            name = _FIELDS.get(fk.value) if fk.kind == "str" else None
            where = f"{ve}.{fk.value}"
            if name is None:
                raise err(f"unknown field {fk.value!r} (known: devices, mounts, images, labels, cgroup)", fk, where)
            if name == "labels":
                if fv.kind != "map":
                    raise err("labels: expected a mapping of names to values", fv, where)
                for lk, lv in fv.value:
                    if lk.kind != "str" or lv.kind != "str":
                        raise err("labels: names and values are strings", lk, where)
                    entry["labels"][lk.value] = lv.value
            elif name == "cgroup":
                if fv.kind != "str":
                    raise err("cgroup: expected a string", fv, where)
                entry["cgroup"] = fv.value
            else:
                items = strings(fv, where)
                if name == "devices":
                    for item in items:
                        claim(item.value, ve, item)
                values = [item.value for item in items]
                if name == "mounts":
                    values = [os.path.normpath(m) for m in values]
                entry[name].extend(values)
    return tuple(
        VE(ve, mounts=tuple(dict.fromkeys(e["mounts"])), devices=tuple(dict.fromkeys(e["devices"])),
           images=tuple(dict.fromkeys(e["images"])), cgroup=e["cgroup"],
           labels=tuple(sorted(e["labels"].items())))
        for ve, e in found.items()
    )
