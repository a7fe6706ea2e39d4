"""The journal on disk: records, checksums, acknowledgement, ownership, permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlm_mlflow._event import RunEnd, RunStart, Step
from rlm_mlflow._journal import Journal
from rlm_mlflow._orphans import orphans
from rlm_mlflow._records import Problem, frame, parse


def steps(first: int, n: int) -> list[Step]:
    return [Step("r", i, 0.5, float(i), 1_700_000_000.0 + i) for i in range(first, first + n)]


def write_journal(spool: Path, drains: list[list]) -> Journal:  # type: ignore[type-arg]
    journal = Journal(spool, 1 << 30, {"experiment": "exp"})
    for events in drains:
        journal.append(events)
    return journal


def test_a_live_journal_is_not_an_orphan_and_a_dead_ones_records_come_back(tmp_path: Path) -> None:
    start = RunStart("r", 1.0, "env", 3, {"a": 1, "tools": ["x"]}, "key1")
    journal = write_journal(tmp_path, [[start, *steps(0, 3)], steps(3, 2)])
    assert list(orphans(tmp_path)) == []  # its owner holds the lock
    journal.close(remove=False)

    (orphan,) = orphans(tmp_path)
    assert orphan.meta["experiment"] == "exp"
    assert list(orphan.records()) == [[start, *steps(0, 3)], steps(3, 2)]
    assert list(orphans(tmp_path)) == []  # we hold it now
    orphan.release(remove=True)
    assert list(tmp_path.glob("journal-*")) == []


def test_replay_starts_at_the_acknowledged_position_with_the_runs_open_there(
    tmp_path: Path,
) -> None:
    start = RunStart("r", 1.0, "env", 3, {}, "key1")
    journal = Journal(tmp_path, 1 << 30, {})
    position = journal.append([start, *steps(0, 2)])
    journal.append([*steps(2, 2), RunEnd("r", 9.0, True, 4, 2.0, None)])
    journal.ack(position, [start])
    journal.close(remove=False)

    (orphan,) = orphans(tmp_path)
    assert orphan.open_runs() == [start]
    assert list(orphan.records()) == [[*steps(2, 2), RunEnd("r", 9.0, True, 4, 2.0, None)]]
    orphan.release(remove=True)


def test_a_corrupt_record_is_reported_and_skipped_without_losing_its_neighbours(
    tmp_path: Path,
) -> None:
    journal = write_journal(tmp_path, [steps(0, 2), steps(2, 2), steps(4, 2)])
    journal.close(remove=False)
    (segment,) = tmp_path.glob("journal-*/*.seg")
    data = bytearray(segment.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF  # a bit flipped in the second record's payload
    segment.write_bytes(bytes(data))
    with segment.open("ab") as torn:  # and a torn write at the end (power cut)
        torn.write(b"RLMJ\x00\x00\x10\x00\x00")

    (orphan,) = orphans(tmp_path)
    assert list(orphan.records()) == [steps(0, 2), steps(4, 2)]
    assert orphan.corrupt == 2
    orphan.release(remove=True)


def test_spool_files_are_owner_only(tmp_path: Path) -> None:
    os.umask(0o022)
    journal = write_journal(tmp_path / "spool", [steps(0, 1)])
    try:
        assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
        assert stat.S_IMODE(journal.dir.stat().st_mode) == 0o700
        for path in journal.dir.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    finally:
        journal.close(remove=True)


def test_segments_before_the_acknowledged_one_are_deleted(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("rlm_mlflow._journal.SEGMENT_BYTES", 500)  # a segment a record
    journal = Journal(tmp_path, 1 << 30, {})
    positions = [journal.append(steps(i * 10, 10)) for i in range(10)]
    assert len(list(journal.dir.glob("*.seg"))) > 3
    journal.ack(positions[-1], [])
    assert [p.name for p in journal.dir.glob("*.seg")] == [f"{positions[-1][0]:08d}.seg"]
    journal.close(remove=True)


# -- the record format: round trip and corruption (hypothesis) -------------------------------

plain_text = st.text(max_size=20)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | plain_text
extras = st.none() | st.dictionaries(plain_text, scalars, max_size=3)
step_events = st.builds(
    Step,
    plain_text,
    st.integers(0, 2**63 - 1),
    st.floats(allow_nan=False),
    st.floats(allow_nan=False),
    st.floats(0, 2e9),
    extra=extras,
)
start_events = st.builds(
    RunStart,
    plain_text,
    st.floats(0, 2e9),
    plain_text,
    st.integers(0, 10**9),
    st.dictionaries(plain_text, scalars, max_size=4),
    plain_text,
    extra=extras,
)
end_events = st.builds(
    RunEnd,
    plain_text,
    st.floats(0, 2e9),
    st.booleans(),
    st.integers(0, 10**6) | st.none(),
    st.floats(allow_nan=False) | st.none(),
    plain_text | st.none(),
    st.sampled_from(["FINISHED", "KILLED"]),
    extra=extras,
)
records = st.lists(
    st.lists(step_events | start_events | end_events, min_size=1, max_size=4),
    min_size=1,
    max_size=8,
)


def recovered(data: bytes) -> list[list]:  # type: ignore[type-arg]
    return [item for _, item in parse(data) if not isinstance(item, Problem)]


@given(records)
def test_records_round_trip(batches: list[list]) -> None:  # type: ignore[type-arg]
    data = b"".join(frame(batch) for batch in batches)
    assert recovered(data) == batches


@given(records, st.data())
def test_corruption_costs_only_the_records_it_touches(
    batches: list[list],
    data: st.DataObject,  # type: ignore[type-arg]
) -> None:
    frames = [frame(batch) for batch in batches]
    spans, at = [], 0
    for f in frames:
        spans.append((at, at + len(f)))
        at += len(f)
    blob = bytearray(b"".join(frames))
    touched: set[int] = set()
    kind = data.draw(st.sampled_from(["flip", "truncate", "garbage"]))
    if kind == "flip":
        original = bytes(blob)
        for position in data.draw(st.lists(st.integers(0, len(blob) - 1), max_size=5)):
            blob[position] ^= data.draw(st.integers(1, 255))
        touched |= {i for i, (a, b) in enumerate(spans) if blob[a:b] != original[a:b]}
    elif kind == "truncate":
        cut = data.draw(st.integers(0, len(blob)))
        del blob[cut:]
        touched |= {i for i, (a, b) in enumerate(spans) if b > cut}
    else:
        position = data.draw(st.integers(0, len(blob)))
        garbage = data.draw(st.binary(min_size=1, max_size=40))
        blob[position:position] = garbage
        touched |= {i for i, (a, b) in enumerate(spans) if a < position < b}
    intact = [batch for i, batch in enumerate(batches) if i not in touched]
    assert recovered(bytes(blob)) == intact  # every intact record once, in order; never raises


@pytest.mark.parametrize(
    "ack",
    [
        b"",
        b"{",
        b"garbage\x00\xff",
        b'{"segment": -1, "offset": 0}',
        b'{"segment": "x"}',
        b"[1, 2]",
        b'{"segment": 1, "offset": 10, "open_runs": [[1, 2]]}',
    ],
)
def test_an_unreadable_ack_means_replay_everything_on_disk(tmp_path: Path, ack: bytes) -> None:
    start = RunStart("r", 1.0, "env", 3, {}, "key1")
    journal = write_journal(tmp_path, [[start, *steps(0, 2)], steps(2, 2)])
    journal.close(remove=False)
    (journal_dir,) = tmp_path.glob("journal-*")
    (journal_dir / "ack.json").write_bytes(ack)
    (orphan,) = orphans(tmp_path)
    assert orphan.open_runs() == []  # every run's start is among the records replayed
    assert list(orphan.records()) == [[start, *steps(0, 2)], steps(2, 2)]
    orphan.release(remove=True)


def test_version_0_records_are_still_read(tmp_path: Path) -> None:
    import struct
    import zlib

    from rlm_mlflow._records import encode

    payload = encode(steps(0, 3))
    old = struct.pack(">4sII", b"RLMJ", len(payload), zlib.crc32(payload)) + payload
    assert recovered(old + frame(steps(3, 1))) == [steps(0, 3), steps(3, 1)]


@pytest.mark.parametrize("level", ["never", "batch", "always"])
def test_each_fsync_level_syncs_what_the_docs_say(
    tmp_path: Path, level: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rlm_mlflow._journal
    from rlm_mlflow._journal import SPILL_FILE, fsync_dir
    from rlm_mlflow._spill import Spill

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert fsync_dir is rlm_mlflow._journal.fsync_dir
    journal = Journal(tmp_path, 1 << 30, {}, level)
    created = list(synced)
    synced.clear()
    position = journal.append(steps(0, 3))
    appended = list(synced)
    synced.clear()
    journal.ack(position, [])
    acked = list(synced)
    synced.clear()
    spill = Spill(journal.dir / SPILL_FILE, durable=level == "always")
    spill.push(steps(3, 1)[0])
    spilled = list(synced)
    journal.close(remove=True)
    if level == "never":
        assert created == appended == acked == spilled == []
        return
    assert str(tmp_path) in created and str(journal.dir) in created  # directory entries
    assert [Path(p).name for p in appended] == ["00000001.seg"]  # one fsync per drain
    assert str(journal.dir / "ack.tmp") in acked  # the new ack, before its rename
    assert str(journal.dir) in acked  # the rename of ack.json
    assert [Path(p).name for p in spilled] == (["spill.log"] if level == "always" else [])


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from rlm_mlflow._event import Step
from rlm_mlflow._journal import Journal
journal = Journal(Path({spool!r}), 1 << 30, {{"experiment": "e"}}, "never")
for i in range(50):
    journal.append([Step("r", i, 0.5, 0.5, 1.0)])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_with_fsync_never_a_killed_process_loses_nothing_it_journalled(tmp_path: Path) -> None:
    from support.children import run_python

    done = run_python(KILLED_WRITER.format(spool=str(tmp_path)), timeout=60)
    assert done.returncode == -9
    (orphan,) = orphans(tmp_path)
    assert [r[0].step for r in orphan.records()] == list(range(50)) and orphan.corrupt == 0
    orphan.release(remove=True)


def test_a_journal_being_created_is_never_taken_by_a_replayer(tmp_path: Path) -> None:
    """Two sinks starting on one spool: one creates its journal while the other replays
    (takes and deletes) every orphan it finds. A journal whose lock file exists but is not
    locked yet must not pass for an orphan (it did, in 2.7% of the starts of a stress run)."""
    import threading

    spool = tmp_path / "spool"
    stop = threading.Event()
    taken: list[str] = []

    def replayer() -> None:
        while not stop.is_set():
            for orphan in orphans(spool):
                taken.append(orphan.dir.name)
                orphan.release(remove=True)

    thread = threading.Thread(target=replayer)
    thread.start()
    try:
        for _ in range(1000):
            journal = Journal(spool, 1 << 30, {"experiment": "e"}, "never")
            journal.append(steps(0, 1))
            assert (journal.dir / "meta.json").exists()
            journal.close(remove=True)
    finally:
        stop.set()
        thread.join()
    assert taken == []


def test_a_journal_without_meta_is_left_alone(tmp_path: Path) -> None:
    # What a writer that died between creating its directory and writing its meta leaves:
    # nothing to judge it by (no destination, no records), so no replayer takes it.
    (tmp_path / "journal-1-dead").mkdir()
    (tmp_path / "journal-1-dead" / "lock").touch()
    assert list(orphans(tmp_path)) == []
    assert (tmp_path / "journal-1-dead" / "lock").exists()


def test_sinks_starting_at_once_on_one_spool_keep_their_own_journals(tmp_path: Path) -> None:
    """Two sinks of one destination start on one spool at the same instant, 200 times:
    each gets its journal, and neither's start-up replay refuses or takes the other's."""
    import threading

    from support.memory import MemoryExporter

    from rlm_mlflow import MLflowSink

    spool = tmp_path / "spool"

    def start(at_once: threading.Barrier, sinks: list[MLflowSink]) -> None:
        at_once.wait()
        sink = MLflowSink(
            True,
            experiment="shared",
            tracking_uri="http://127.0.0.1:9",
            spool_dir=str(spool),
            exporter=MemoryExporter(),
            handle_sigterm=False,
        )
        sinks.append(sink)

    for _ in range(200):
        at_once = threading.Barrier(2)
        sinks: list[MLflowSink] = []
        starting = [threading.Thread(target=start, args=(at_once, sinks)) for _ in range(2)]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        dirs = [Path(sink.status()["spool"]) for sink in sinks]
        assert len(dirs) == 2 and all(d.is_dir() and d.parent == spool for d in dirs), dirs
        for sink in sinks:
            sink.on_run_start("r", task="t", environment="e", params={})
            assert sink.close(timeout=30)
            assert sink.replayed is not None and sink.replayed.journals == 0
        assert list(spool.glob("journal-*")) == []


def test_status_shows_the_spool_on_off_or_refused_and_why(tmp_path: Path) -> None:
    from support.memory import MemoryExporter

    from rlm_mlflow import MLflowSink

    def sink(spool_dir: str) -> MLflowSink:
        return MLflowSink(
            True, exporter=MemoryExporter(), spool_dir=spool_dir, handle_sigterm=False
        )

    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    refused, off, on = sink(str(not_a_dir)), sink(""), sink(str(tmp_path / "spool"))
    try:
        assert refused.status()["spool"].startswith("refused: FileExistsError: ")
        assert str(not_a_dir) in refused.status()["spool"]
        assert "\n" not in refused.status()["spool"]
        assert off.status()["spool"] == "off"
        (journal,) = (tmp_path / "spool").glob("journal-*")
        assert on.status()["spool"] == str(journal)
        refused.on_run_start("r", task="t", environment="e", params={})
    finally:
        for each in (refused, off, on):
            assert each.close(timeout=30)
    assert refused.status()["delivered"] == 1  # the sink itself works without its spool
