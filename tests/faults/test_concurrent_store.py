"""The same instance on two associations at once (a PACS retrying while the first is slow).

Both handlers find no stored version and write the same file name; whatever order they
finish in, the index row that wins must keep its file, intact.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest

from dicomnode.db import Database
from dicomnode.spool.index import Index
from dicomnode.spool.store import Spool, StoreOutcome

from .harness import IndexView


@pytest.mark.parametrize("same_bytes", [True, False], ids=["identical", "different"])
def test_same_instance_stored_twice_at_once_keeps_an_intact_file(
    same_bytes: bool,
    phantom_files: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data_dir = tmp_path / "node"
    spool = Spool(data_dir, Index(Database(data_dir)), min_free_bytes=0)
    first = phantom_files[0].read_bytes()
    second = first if same_bytes else first[:-2] + b"\x01\x02"
    # Given two stores of one SOP Instance UID that both wrote their file before indexing
    barrier = threading.Barrier(2, timeout=1)
    record = Index.add_instance

    def record_together(self: Index, *args: object, **kwargs: object) -> None:
        # The other store may never get here (stores are serialised): then go on alone.
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        record(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Index, "add_instance", record_together)
    outcomes: list[StoreOutcome] = []

    def store(data: bytes) -> None:
        outcomes.append(spool.store(data, calling_ae="A", calling_host="127.0.0.1"))

    threads = [threading.Thread(target=store, args=(d,)) for d in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    # Then both are acknowledged and every indexed version has its own intact file
    assert len(outcomes) == 2
    assert IndexView(data_dir).consistency_problems() == []
    expected = 1 if same_bytes else 2
    assert IndexView(data_dir).instance_count() == expected
