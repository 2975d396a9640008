"""Test rigs: real parts set up and always taken down again (loop devices, cgroups, the
daemon as a subprocess, an HTTP endpoint, files of known content). Most need root.

The pure fakes (no kernel, no I/O) are in :mod:`fsnotifyd.testing`, beside the Protocols they
stand in for.
"""
