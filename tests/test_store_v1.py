"""A store written by logstate 0.1.0 (segment format 1, snapshot version 2) opens.

``tests/data/store-v1`` was written by logstate 0.1.0 (commit 92e9194) with::

    s = LocalFileStorage(d, sync="none", segment_size=4096, compress_min_size=2000,
                         auto_compact=False)
    200 sets k000..k199 = i; remove k005; "bytes" = b"\\x00\\xffraw"; "text" = "héllo";
    sub-storage "sub": "a" = [1, 2, 3];
    a batch: g1 = 1.5, g2 = None, remove k006;
    a compressed batch: c00..c59 = "x" * 50;
    InMemoryStorage(sub): "b" = True, flush(checkpoint={"topic": 7}); close all

(two segments and an index snapshot). Every later format change must keep
this test passing: with the snapshot, and by a full scan.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from logstate import LocalFileStorage

from .helpers import observed_state

DATA = Path(__file__).parent / "data" / "store-v1"


def expected() -> dict[str, dict[str, object]]:
    root: dict[str, object] = {f"k{i:03d}": i for i in range(200) if i not in (5, 6)}
    root.update({"bytes": b"\x00\xffraw", "text": "h\u00e9llo", "g1": 1.5, "g2": None})
    root.update({f"c{i:02d}": "x" * 50 for i in range(60)})
    return {"": root, "sub": {"a": [1, 2, 3], "b": True}}


@pytest.mark.parametrize("use_snapshot", [True, False])
def test_store_written_by_0_1_0_opens_with_every_value(tmp_path: Path, use_snapshot: bool) -> None:
    directory = tmp_path / "store"
    shutil.copytree(DATA, directory)
    with LocalFileStorage(directory, use_snapshot=use_snapshot) as s:
        assert s.report.snapshot_used is use_snapshot
        assert observed_state(s) == expected()
        assert s.checkpoint == {"topic": 7}
        assert list(s.keys(prefix="k00")) == [f"k00{i}" for i in (0, 1, 2, 3, 4, 7, 8, 9)]
        s._check()
        s["new"] = 1  # and it takes new writes, compacts, reopens
        s.compact()
    with LocalFileStorage(directory) as s:
        state = expected()
        state[""]["new"] = 1
        assert observed_state(s) == state
