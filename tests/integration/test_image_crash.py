"""Crash tests of the image manager with a real SIGKILL.

A child process (this module run as a script) replays a plan of steps generated from a seed:
writes and discards through a :class:`Stack` with periodic ``flush()``, and, depending on the
kind, snapshots, merges, compactions or grows and cuts. After each flush or operation returns,
it appends the step's number to a side file (``start N`` goes there before an operation, to
count the kills that land inside one). The parent SIGKILLs it at a random moment, then:

- ``check(repair=True)`` and then ``check()`` is clean, and the image opens;
- every step up to the last one recorded is in the data (the flushed writes read back);
- each byte touched by a step after it (unflushed, or in the operation the kill interrupted)
  holds either its flushed value or one of the values those steps wrote: never garbage from
  another cluster. Each write fills its range with one byte value of its own.

The ``ext4`` kind starts from an image made by ``ops.create`` (mkfs.ext4) and only snapshots,
merges, compacts and grows it: after the kill and the repair the disk reads exactly as it was
formatted and ``e2fsck -fn`` on its raw export is clean.

Default: ``ITERATIONS`` (10) kills per kind. Stress mode: ``FSNOTIFYD_STRESS=1`` runs 50 per
kind (``FSNOTIFYD_STRESS_ITERATIONS=N`` sets another count). A failure prints the kind, seed
and kill delay; ``FSNOTIFYD_CRASH_KEEP=1`` keeps the image directory of a failing iteration.

A SIGKILL keeps the page cache, so these tests check the order of writes within the process
and the recovery, not what a power cut would lose (the fdatasync ordering is argued in
docs/image-format.md, not measured here).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KiB, MiB = 1 << 10, 1 << 20
CLUSTER = 4 * KiB
START_SIZE = 2 * MiB
STRESS = os.environ.get("FSNOTIFYD_STRESS") == "1"
ITERATIONS = int(os.environ.get("FSNOTIFYD_STRESS_ITERATIONS", "50")) if STRESS else 10
KINDS = ["write", "snapshot", "merge", "compact", "resize", "direct", "discard"]
DIRECT_CLUSTER = 256 * KiB  # "direct": the exporter's data path (direct I/O, write-behind) on larger clusters
PIECE_CLUSTER = 64 * KiB  # "discard": clusters of 16 pages, freed by the discards and zero writes that add up
EXT4_SIZE = 32 * MiB
OPS = {"flush", "snap", "merge", "compact", "grow", "cut"}
MAX_KILL_DELAY = 0.6  # seconds after the child is ready; every plan runs for longer


# -- the plan: the same list of steps in the child and the parent ------------------------------

def plan(kind: str, seed: int) -> list[tuple]:
    rng = random.Random(f"{kind}:{seed}")
    steps: list[tuple] = []
    size = START_SIZE
    value = 0

    def io(n: int, *, discard: float = 0.2, whole: bool = False) -> None:
        nonlocal value
        for _ in range(n):
            if kind == "direct" and rng.random() < 0.7:  # aligned and large: direct, written behind
                off = rng.randrange(size // 4096) * 4096
                length = rng.choice([64 * KiB, 128 * KiB, DIRECT_CLUSTER, 2 * DIRECT_CLUSTER, 4096])
            elif whole:
                vc = rng.randrange(size // CLUSTER)
                off, length = vc * CLUSTER, CLUSTER * rng.randint(1, 4)
            else:
                off = rng.randrange(size)
                length = rng.choice([1, 100, 511, CLUSTER // 2, CLUSTER, CLUSTER + 7, 3 * CLUSTER,
                                     rng.randrange(1, 6 * CLUSTER)])
            length = min(length, size - off)
            if rng.random() < discard:
                steps.append(("d", off, length))
            else:
                value = value % 255 + 1
                steps.append(("w", off, length, value))

    if kind in ("write", "direct"):
        for _ in range(5000):
            io(rng.randint(1, 8))
            steps.append(("flush",))
    elif kind == "snapshot":
        for _ in range(400):
            io(rng.randint(5, 20))
            steps.append(("flush",))
            steps.append(("snap",))
    elif kind == "merge":
        for _ in range(300):
            steps.append(("snap",))
            io(rng.randint(10, 30))
            steps.append(("flush",))
            steps.append(("merge",))
    elif kind == "compact":
        for _ in range(200):
            io(rng.randint(20, 60), discard=0.0, whole=True)
            steps.append(("flush",))
            io(rng.randint(20, 60), discard=1.0, whole=True)
            steps.append(("flush",))
            steps.append(("compact",))
    elif kind == "resize":
        for _ in range(1000):
            io(rng.randint(5, 15))
            steps.append(("flush",))
            if (rng.random() < 0.7 or size <= START_SIZE) and size < 40 * MiB:
                size += rng.choice([MiB, 3 * MiB + 512, 5 * MiB])
                steps.append(("grow", size))
            else:
                size -= rng.choice([MiB, 2 * MiB - 512])
                steps.append(("cut", size))
    elif kind == "discard":  # online discard: clusters given back piece by piece, over snapshots too
        c = PIECE_CLUSTER
        for r in range(150):
            for vc in rng.sample(range(size // c), 6):
                value = value % 255 + 1
                steps.append(("w", vc * c, c, value))
                pieces = sorted({0, c, *(rng.randrange(0, c, rng.choice([1, 512, 4096]))
                                         for _ in range(rng.randint(2, 11)))})
                cut = list(pairwise(pieces))
                rng.shuffle(cut)
                for a, b in cut:  # a discard or a write of zeros: the same to the image
                    steps.append(("d", vc * c + a, b - a) if rng.random() < 0.7 else ("w", vc * c + a, b - a, 0))
                    if rng.random() < 0.2:
                        steps.append(("flush",))
            steps.append(("flush",))
            if r % 25 == 24:
                steps.append(("snap",))
    elif kind == "ext4":  # no writes: the formatted filesystem must come through every operation intact
        size = EXT4_SIZE
        for i in range(300):
            steps += [("snap",), ("merge",), ("compact",)]
            if i % 4 == 3 and size < 2 * EXT4_SIZE:
                size += MiB
                steps.append(("grow", size))
    else:
        raise ValueError(kind)
    return steps


# -- the child ---------------------------------------------------------------------------------

def child_main(directory: str, kind: str, seed: int, log: str) -> None:
    from fsnotifyd.image import descriptor as dd
    from fsnotifyd.image import ops
    from fsnotifyd.image.stack import Stack

    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def note(text: str) -> None:
        os.write(fd, f"{text}\n".encode())

    steps = plan(kind, seed)
    stack = Stack.open(directory)
    if kind == "direct":
        assert stack.use_direct_io(write_behind=4)
    note("ready")
    for i, step in enumerate(steps):
        op = step[0]
        if op == "w":
            stack.write(step[1], bytes([step[3]]) * step[2])
            continue
        if op == "d":
            stack.discard(step[1], step[2])
            continue
        note(f"start {i}")
        if op == "flush":
            stack.flush()
        elif op == "snap":
            ops.snapshot(stack, directory)
        elif op == "merge":
            chain = dd.load(os.path.join(directory, dd.NAME)).chain()
            if len(chain) > 1:
                ops.merge(directory, chain[0].guid, stack=stack)
        elif op == "compact":
            ops.compact(stack.top, batch=4)  # small batches: more commits for a kill to land between
        elif op == "grow":
            ops.grow_stack(stack, directory, step[1])
        elif op == "cut":
            ops.cut_stack(stack, directory, step[1])
        note(str(i))
    stack.close()
    note("end")


# -- the parent --------------------------------------------------------------------------------

def expected(steps: list[tuple], done: int, end: int) -> tuple[bytearray, list[tuple[int, int, int]], set[int]]:
    """The model after steps [0, done]; the ranges steps (done, end] may have changed, each
    ``(start, end, value)``; the possible virtual sizes."""
    from fsnotifyd.image.format import SECTOR

    model = bytearray(START_SIZE)
    for step in steps[:done + 1]:
        op = step[0]
        if op == "w":
            model[step[1]:step[1] + step[2]] = bytes([step[3]]) * step[2]
        elif op == "d":
            model[step[1]:step[1] + step[2]] = bytes(step[2])
        elif op in ("grow", "cut"):
            new = -(-step[1] // SECTOR) * SECTOR
            if new < len(model):
                del model[new:]
            else:
                model.extend(bytes(new - len(model)))
    maybe: list[tuple[int, int, int]] = []
    sizes = {len(model)}
    for step in steps[done + 1:end + 1]:
        op = step[0]
        if op in ("w", "d"):
            maybe.append((step[1], step[1] + step[2], step[3] if op == "w" else 0))
        elif op in ("grow", "cut"):
            new = -(-step[1] // SECTOR) * SECTOR
            sizes.add(new)
            if new < len(model):
                maybe.append((new, len(model), 0))
    return model, maybe, sizes


def verify(directory: str, steps: list[tuple], lines: list[str]) -> Counter:
    from fsnotifyd.image.check import check
    from fsnotifyd.image.stack import Stack

    done = max((int(x) for x in lines if x.isdigit()), default=-1)
    end = next((i for i in range(done + 1, len(steps)) if steps[i][0] in OPS), len(steps) - 1)
    first = check(directory)
    repaired = check(directory, repair=True)
    assert all(p.repaired for p in repaired.problems), str(repaired)
    after = check(directory)
    assert after.clean, f"not clean after repair:\n{after}\n(first check:\n{first})"
    kinds = classify(first.problems)
    model, maybe, sizes = expected(steps, done, end)
    with Stack.open(directory) as s:
        assert s.size in sizes, (s.size, sizes)
        got = s.read(0, s.size)
    if len(model) < len(got):
        model.extend(bytes(len(got) - len(model)))
    del model[len(got):]
    if got == model:
        return kinds
    bad = []
    for start in range(0, len(got), CLUSTER):
        if got[start:start + CLUSTER] == model[start:start + CLUSTER]:
            continue
        for i in range(start, min(start + CLUSTER, len(got))):
            if got[i] != model[i] and not any(a <= i < b and v == got[i] for a, b, v in maybe):
                bad.append((i, got[i], model[i], [(a, b, v) for a, b, v in maybe if a <= i < b][:5]))
        if len(bad) > 5:
            break
    assert not bad, bad[:6]
    return kinds


def verify_ext4(directory: str, original: bytes, scratch: str) -> Counter:
    """The filesystem reads exactly as formatted (zeros past its end after a grow) and e2fsck
    finds nothing."""
    from fsnotifyd.image.check import check
    from fsnotifyd.image.stack import Stack

    first = check(directory)
    repaired = check(directory, repair=True)
    assert all(p.repaired for p in repaired.problems), str(repaired)
    after = check(directory)
    assert after.clean, f"not clean after repair:\n{after}\n(first check:\n{first})"
    with Stack.open(directory, writable=False) as s:
        got = s.read(0, s.size)
    assert got[:len(original)] == original and got.count(0, len(original)) == len(got) - len(original)
    with open(scratch, "wb") as f:
        f.write(got)
    try:
        r = subprocess.run(["e2fsck", "-fn", scratch], capture_output=True, text=True)
    finally:
        os.unlink(scratch)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return classify(first.problems)


def classify(problems: list) -> Counter:
    kinds = Counter()
    for p in problems:
        name = os.path.basename(p.file)
        if p.field:
            kinds["bat" if p.field.startswith("bat[") else p.field] += 1
        else:
            kinds["descriptor.tmp" if name.endswith(".tmp") else
                  "leftover delta" if name.startswith("root.hds.") else "other file"] += 1
    return kinds


def run_once(kind: str, seed: int, delay: float, base: Path) -> tuple[bool, bool, Counter]:
    """One kill; returns (killed, killed inside an operation other than flush, problems found)."""
    from fsnotifyd.image import ops
    from fsnotifyd.image.stack import Stack

    d = str(base / f"{kind}-{seed}")
    log = str(base / f"{kind}-{seed}.log")
    original = b""
    if kind == "ext4":
        ops.create(d, EXT4_SIZE, cluster=CLUSTER)
        with Stack.open(d, writable=False) as s:
            original = s.read(0, s.size)
    else:
        ops.create_empty(d, START_SIZE, {"direct": DIRECT_CLUSTER, "discard": PIECE_CLUSTER}.get(kind, CLUSTER))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-m", "tests.integration.test_image_crash", d, kind, str(seed), log],
                             cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(log) and Path(log).read_text().startswith("ready")):
            if child.poll() is not None:
                raise AssertionError(f"child died: {child.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "child never got ready"
            time.sleep(0.005)
        time.sleep(delay)
        killed = child.poll() is None
        if killed:
            child.send_signal(signal.SIGKILL)
        rc = child.wait(timeout=30)
        err = child.stderr.read().decode()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert killed or rc == 0, f"child failed ({rc}): {err[-3000:]}"
    lines = Path(log).read_text().split()
    text = Path(log).read_text().splitlines()
    in_op = False
    if killed and text and text[-1].startswith("start "):
        in_op = plan(kind, seed)[int(text[-1].split()[1])][0] != "flush"
    try:
        if kind == "ext4":
            kinds = verify_ext4(d, original, str(base / "raw"))
        else:
            kinds = verify(d, plan(kind, seed), [x for x in text if x.isdigit()])
    except BaseException:
        if os.environ.get("FSNOTIFYD_CRASH_KEEP") == "1":
            keep = tempfile.mkdtemp(prefix=f"fsnd-crash-{kind}-{seed}-")
            shutil.copytree(d, os.path.join(keep, "img"))
            shutil.copy(log, keep)
            print(f"kept in {keep}", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(d, ignore_errors=True)
        os.unlink(log)
    del lines
    return killed, in_op, kinds


@pytest.mark.parametrize("kind", KINDS + ["ext4"])
def test_sigkill_then_check_repair_recovers(kind, tmp_path, capsys):
    if kind == "ext4" and (shutil.which("mkfs.ext4") is None or shutil.which("e2fsck") is None):
        pytest.skip("e2fsprogs not installed")
    rng = random.Random()
    seed0 = rng.randrange(1 << 30)
    killed = in_op = 0
    found: Counter = Counter()
    t0 = time.monotonic()
    for it in range(ITERATIONS):
        seed = seed0 + it
        delay = rng.uniform(0.0, MAX_KILL_DELAY)
        try:
            k, o, kinds = run_once(kind, seed, delay, tmp_path)
        except AssertionError as e:
            raise AssertionError(f"{kind} seed={seed} delay={delay:.3f}: {e}") from None
        killed += k
        in_op += o
        found.update(kinds)
    with capsys.disabled():
        print(f"\n  {kind}: {ITERATIONS} runs, {killed} killed, {in_op} inside an operation, "
              f"{time.monotonic() - t0:.1f} s; check found {dict(found)}")
    assert killed >= 0.8 * ITERATIONS  # a plan may end before the kill


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
