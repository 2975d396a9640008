"""Pure parsers of kernel text: no I/O, never raise, whatever the input.

* :mod:`.kmsg` — the ``/dev/kmsg`` record format;
* :mod:`.ext4`, :mod:`.jbd2`, :mod:`.block` — the messages of one subsystem each;
* :mod:`.classify` — a record to an observation, through those;
* :mod:`.mountfail` — the reason line before ext4's ``mount failed``;
* :mod:`.logtext` — ``dmesg`` / ``journalctl -k`` lines to records.

The live source (:mod:`fsnotifyd.sources.kmsg`) and the replay (:mod:`fsnotifyd.replay`) both
import from here; neither imports the other. A new filesystem gets its own module beside
:mod:`.ext4` and one prefix in :mod:`.classify`.
"""
