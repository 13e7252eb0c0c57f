"""Request ids made in batches: still random version-4 UUIDs, never repeated across a fork."""

from __future__ import annotations

import os
import uuid

from extproc.io.request_ids import new_request_id


def test_ids_are_distinct_version_4_uuids_across_batches() -> None:
    ids = [new_request_id() for _ in range(1000)]  # several batches
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value.decode())
        assert parsed.version == 4 and str(parsed).encode() == value


def test_a_forked_child_does_not_repeat_its_parents_next_ids() -> None:
    new_request_id()  # the parent holds a batch it has not used up
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, b"".join(new_request_id() for _ in range(10)))
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0
    parent = [new_request_id() for _ in range(10)]
    assert len(child) == 360
    assert not {child[i : i + 36] for i in range(0, 360, 36)} & set(parent)
