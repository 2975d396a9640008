"""Pure parsers of what the kernel writes: no I/O, never raise, whatever the input.

* :mod:`.kmsg` — the ``/dev/kmsg`` record format;
* :mod:`.ext4`, :mod:`.jbd2`, :mod:`.block` — the messages of one subsystem each;
* :mod:`.classify` — a record to an observation, through those;
* :mod:`.mountfail` — the reason line before ext4's ``mount failed``;
* :mod:`.logtext` — ``dmesg`` / ``journalctl -k`` lines to records;
* :mod:`.fanotify`, :mod:`.quota` — the binary records of fanotify and of the ``VFS_DQUOT``
  netlink family.

The live sources (:mod:`fsnotifyd.sources`) and the replay (:mod:`fsnotifyd.replay`) both
import from here; neither imports the other, and nothing here imports either. A new
filesystem gets its own module beside :mod:`.ext4` and one prefix in :mod:`.classify`.
"""
