"""The journal on disk: records, checksums, acknowledgement, ownership, permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from rlm_mlflow._event import RunEnd, RunStart, Step
from rlm_mlflow._spool import Journal, orphans


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
    monkeypatch.setattr("rlm_mlflow._spool.SEGMENT_BYTES", 500)  # a segment a record
    journal = Journal(tmp_path, 1 << 30, {})
    positions = [journal.append(steps(i * 10, 10)) for i in range(10)]
    assert len(list(journal.dir.glob("*.seg"))) > 3
    journal.ack(positions[-1], [])
    assert [p.name for p in journal.dir.glob("*.seg")] == [f"{positions[-1][0]:08d}.seg"]
    journal.close(remove=True)
