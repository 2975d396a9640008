"""The reference ploop-style image manager: thin delta images, snapshots, compaction.

Format in ``docs/image-format.md``. Layers, each on the one before: :mod:`.format` (header and
BAT of one delta file, validated), :mod:`.delta` (one open delta: clusters, allocation,
discard, durable commits), :mod:`.descriptor` (the ``DiskDescriptor.xml`` stack),
:mod:`.stack` (the virtual disk seen through the stack of deltas).
"""
