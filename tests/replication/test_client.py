"""The NATS client (``logstate.replication._client``) against real nats-server processes.

What each test pins down, on nats-server 2.15.1 and nats-py 2.16.0:
- a publish with ``Nats-Expected-Last-Subject-Sequence`` is stored when the
  seq matches and raises :class:`WrongLastSequence` (10071, with the actual
  last seq) when not;
- the retry of a publish whose ack was lost (same message id, same expected
  seq), recorded exactly: an R1 stream answers 10071 (the expected-seq check
  comes before the duplicate check), an R3 stream answers a duplicate ack
  with the original seq, and past the duplicate window R3 answers 10071 too;
- reads: last message, one message, ranges in order with their bounds over
  1000+ messages of interleaved subjects; purge counts and keeps the
  message at its bound;
- the object store: a 5 MB file put, got back byte for byte (digest
  verified), listed, replaced, deleted; read as chunks, a chunk replaced by
  other bytes of its size (same size, another digest) or one chunk more is
  refused after the last chunk, and ``get_object`` leaves no file;
- bounds: a refused port fails within the timeout; a paused server times a
  call out; a payload that the server would refuse is refused before it is
  sent;
- a broker restart in the middle of publishing is survived without a loss
  or a duplicate; calls from a thread running its own asyncio loop work; a
  forked child cannot use its parent's client and makes its own.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from logstate._errors import ReplicationError
from logstate.replication._client import (
    ApiError,
    Client,
    Message,
    ObjectNotFound,
    WrongLastSequence,
)
from logstate.replication._jsapi import headers_size
from tests.replication.servers import NatsCluster, NatsServer, free_port

T_S = 5.0


@pytest.fixture
def client(nats_server: NatsServer) -> Iterator[Client]:
    made = Client.get(nats_server.url, timeout_s=T_S)
    try:
        yield made
    finally:
        made.release()


def publish_expecting(client: Client, subject: str, data: bytes, msg_id: str, last: int) -> int:
    headers = {"Nats-Msg-Id": msg_id, "Nats-Expected-Last-Subject-Sequence": str(last)}
    return client.publish(subject, data, headers, T_S)


# ---------------------------------------------------------------- publish


def test_publish_with_the_expected_last_subject_seq_is_stored_and_a_mismatch_is_10071(
    client: Client,
) -> None:
    client.ensure_stream("EXP", ["exp.>"], 1, T_S)
    assert publish_expecting(client, "exp.a", b"a1", "a1", 0) == 1
    assert publish_expecting(client, "exp.b", b"b1", "b1", 0) == 2  # per subject
    assert publish_expecting(client, "exp.a", b"a2", "a2", 1) == 3

    with pytest.raises(WrongLastSequence) as caught:
        publish_expecting(client, "exp.a", b"a3", "a3", 1)
    assert caught.value.err_code == 10071
    assert caught.value.code == 400
    assert caught.value.last_seq == 3
    assert caught.value.description == "wrong last sequence: 3"
    assert caught.value.stream == "EXP"
    info = client.stream_info("EXP", T_S)
    assert info is not None and info["state"]["last_seq"] == 3  # nothing stored


def test_retry_after_a_lost_ack_on_r1_is_10071_naming_the_stored_copy(client: Client) -> None:
    client.ensure_stream("LOST1", ["lost1.>"], 1, T_S)
    assert publish_expecting(client, "lost1.p", b"one", "p:1:1-1", 0) == 1
    # the ack was lost: the same message, same id, same expected seq again
    with pytest.raises(WrongLastSequence) as caught:
        publish_expecting(client, "lost1.p", b"one", "p:1:1-1", 0)
    assert caught.value.last_seq == 1
    stored = client.last_message("LOST1", "lost1.p", T_S)
    assert stored is not None and stored.headers["Nats-Msg-Id"] == "p:1:1-1"
    # without the expected seq, the id alone is a duplicate of the stored copy
    ack = client.publish_ack("lost1.p", b"one", {"Nats-Msg-Id": "p:1:1-1"}, T_S)
    assert (ack.stream, ack.stream_seq, ack.duplicate) == ("LOST1", 1, True)
    info = client.stream_info("LOST1", T_S)
    assert info is not None and info["state"]["messages"] == 1


def test_retry_after_a_lost_ack_on_r3_is_a_duplicate_ack_until_the_window_passes(
    nats_cluster: NatsCluster,
) -> None:
    client = Client.get(nats_cluster.urls, timeout_s=T_S)
    try:
        client.ensure_stream("LOST3", ["lost3.>"], 3, T_S, duplicate_window_s=1.0)
        assert publish_expecting(client, "lost3.p", b"one", "p:1:1-1", 0) == 1
        headers = {"Nats-Msg-Id": "p:1:1-1", "Nats-Expected-Last-Subject-Sequence": "0"}
        ack = client.publish_ack("lost3.p", b"one", headers, T_S)
        assert (ack.stream_seq, ack.duplicate) == (1, True)

        time.sleep(1.5)  # past the duplicate window: the expected seq decides
        with pytest.raises(WrongLastSequence) as caught:
            client.publish("lost3.p", b"one", headers, T_S)
        assert caught.value.last_seq == 1
        info = client.stream_info("LOST3", T_S)
        assert info is not None and info["state"]["messages"] == 1
        assert info["config"]["num_replicas"] == 3
    finally:
        client.release()


def test_publish_without_a_stream_is_no_responders_once_its_timeout_is_spent(
    client: Client,
) -> None:
    started = time.monotonic()
    with pytest.raises(ReplicationError, match="no responders"):
        client.publish("nostream.a", b"x", {}, 0.5)
    assert 0.2 <= time.monotonic() - started < 1.5


def test_a_message_over_max_payload_with_its_headers_is_refused_before_it_is_sent(
    client: Client,
) -> None:
    client.ensure_stream("BIG", ["big.>"], 1, T_S)
    assert client.max_payload == 1024 * 1024
    headers = {"Nats-Msg-Id": "big"}
    room = client.max_payload - headers_size(headers)  # the server counts headers too
    with pytest.raises(ReplicationError, match="exceed the server's max_payload"):
        client.publish("big.a", b"x" * (room + 1), headers, T_S)
    # exactly what fits is stored, and the connection was never dropped
    assert client.publish("big.a", b"x" * room, headers, T_S) == 1
    assert client.disconnects == 0


def test_ensure_stream_creates_once_and_leaves_an_existing_stream_as_it_is(
    client: Client,
) -> None:
    assert client.stream_info("ONCE", T_S) is None
    made = client.ensure_stream("ONCE", ["once.>"], 1, T_S)
    config = made["config"]
    assert config["storage"] == "file" and config["allow_direct"] is True
    assert config["duplicate_window"] == 120 * 10**9
    again = client.ensure_stream("ONCE", ["other.>"], 1, T_S, duplicate_window_s=5)
    assert again["config"]["subjects"] == ["once.>"]
    assert again["config"]["duplicate_window"] == 120 * 10**9
    with pytest.raises(ApiError) as caught:  # a single server has no room for R3
        client.ensure_stream("R3", ["r3.>"], 3, T_S)
    assert caught.value.err_code != 0


# ---------------------------------------------------------------- reads


def test_last_message_and_message_return_what_was_stored_or_none(client: Client) -> None:
    client.ensure_stream("READ", ["read.>"], 1, T_S)
    assert client.last_message("READ", "read.a", T_S) is None
    before = time.time()
    client.publish("read.a", b"first", {"K": "v1"}, T_S)
    client.publish("read.b", b"", {}, T_S)
    client.publish("read.a", b"second", {"K": "v2", "Nats-Msg-Id": "m2"}, T_S)
    last = client.last_message("READ", "read.a", T_S)
    assert last is not None
    assert (last.stream_seq, last.subject, last.data) == (3, "read.a", b"second")
    assert last.headers == {"K": "v2", "Nats-Msg-Id": "m2"}
    assert before - 1.0 <= last.time_s <= time.time() + 1.0
    assert client.last_message("READ", "read.>", T_S) == last  # wildcards
    empty = client.message("READ", 2, T_S)
    assert empty == Message(2, "read.b", {}, b"", empty.time_s if empty else 0.0)
    assert client.message("READ", 4, T_S) is None


def test_messages_come_in_order_within_their_bounds_over_thousands(client: Client) -> None:
    client.ensure_stream("MANY", ["many.>"], 1, T_S)
    seqs_a = []
    for i in range(1500):
        subject = "many.a" if i % 3 else "many.b"
        seq = client.publish(subject, b"%d" % i, {"I": str(i)}, T_S)
        if subject == "many.a":
            seqs_a.append(seq)
    got = list(client.messages("MANY", "many.a", 1, T_S))
    assert [m.stream_seq for m in got] == seqs_a
    assert [m.data for m in got] == [b"%d" % (s - 1) for s in seqs_a]
    assert all(m.headers == {"I": m.data.decode()} for m in got)

    middle = seqs_a[500]
    got = list(client.messages("MANY", "many.a", middle, T_S, until_stream_seq=seqs_a[700]))
    assert [m.stream_seq for m in got] == seqs_a[500:701]
    assert list(client.messages("MANY", "many.a", seqs_a[-1] + 1, T_S)) == []
    assert list(client.messages("MANY", "many.zzz", 1, T_S)) == []
    with pytest.raises(ApiError) as caught:  # at the call, not at the first next()
        client.messages("NOSUCH", "many.a", 1, T_S)
    assert caught.value.err_code == 10059


def test_messages_end_at_the_last_message_when_called(client: Client) -> None:
    client.ensure_stream("GROW", ["grow.>"], 1, T_S)
    for i in range(600):
        client.publish("grow.a", b"%d" % i, {}, T_S)
    reading = client.messages("GROW", "grow.a", 1, T_S)  # the bound is taken here
    for i in range(600, 1300):
        client.publish("grow.a", b"%d" % i, {}, T_S)
    assert [m.stream_seq for m in reading] == list(range(1, 601))


def test_messages_of_a_stream_without_direct_get_are_read_one_by_one(client: Client) -> None:
    # a stream made elsewhere without allow_direct: the same answer, more slowly
    assert client.stream_info("NODIRECT", T_S) is None
    nc = client._connection(T_S)
    body = {"name": "NODIRECT", "subjects": ["nodirect.>"], "storage": "file"}
    client._call(
        "NODIRECT",
        "create",
        client._api(nc, "NODIRECT", "$JS.API.STREAM.CREATE.NODIRECT", body, T_S),
        T_S,
    )
    for i in range(20):
        client.publish("nodirect.a", b"%d" % i, {}, T_S)
    got = list(client.messages("NODIRECT", "nodirect.a", 5, T_S, until_stream_seq=15))
    assert [m.stream_seq for m in got] == list(range(5, 16))


def test_purge_removes_the_subjects_messages_before_the_bound_and_says_how_many(
    client: Client,
) -> None:
    client.ensure_stream("PURGE", ["purge.>"], 1, T_S)
    for i in range(10):
        client.publish("purge.a", b"%d" % i, {}, T_S)  # seqs 1..10
    client.publish("purge.b", b"b", {}, T_S)  # seq 11
    assert client.purge("PURGE", "purge.a", 1, T_S) == 0
    assert client.purge("PURGE", "purge.a", 0, T_S) == 0  # never "everything"
    assert client.purge("PURGE", "purge.a", 8, T_S) == 7
    assert client.purge("PURGE", "purge.a", 8, T_S) == 0
    assert [m.stream_seq for m in client.messages("PURGE", "purge.a", 1, T_S)] == [8, 9, 10]
    assert client.message("PURGE", 7, T_S) is None
    assert client.last_message("PURGE", "purge.b", T_S) is not None
    info = client.stream_info("PURGE", T_S)
    assert info is not None
    assert (info["state"]["first_seq"], info["state"]["last_seq"]) == (8, 11)


# ---------------------------------------------------------------- objects


def test_a_5_mb_object_is_put_got_back_listed_replaced_and_deleted(
    client: Client, tmp_path: Path
) -> None:
    source = tmp_path / "snapshot.bin"
    content = os.urandom(5 * 1024 * 1024 + 123)
    source.write_bytes(content)
    client.ensure_bucket("snaps", 1, T_S)
    client.ensure_bucket("snaps", 1, T_S)  # already there
    assert client.list_objects("snaps", T_S) == []

    started = time.time()
    client.put_object("snaps", "p/00000000000000000042", str(source), '{"seq":42}', T_S)
    info = client.object_info("snaps", "p/00000000000000000042", T_S)
    assert info["size"] == len(content) and info["chunks"] == len(content) // (128 * 1024) + 1
    assert info["digest"].startswith("SHA-256=")

    dest = tmp_path / "back.bin"
    client.get_object("snaps", "p/00000000000000000042", str(dest), T_S)
    assert dest.read_bytes() == content
    with pytest.raises(FileExistsError):
        client.get_object("snaps", "p/00000000000000000042", str(dest), T_S)

    client.put_object("snaps", "p/00000000000000000043", str(source), "second", T_S)
    listed = client.list_objects("snaps", T_S)
    assert [(o.name, o.size, o.description) for o in listed] == [
        ("p/00000000000000000042", len(content), '{"seq":42}'),
        ("p/00000000000000000043", len(content), "second"),
    ]
    assert all(started - 1.0 <= o.mtime <= time.time() + 1.0 for o in listed)

    small = tmp_path / "small.bin"
    small.write_bytes(b"replaced")
    client.put_object("snaps", "p/00000000000000000042", str(small), "again", T_S)
    (tmp_path / "back.bin").unlink()
    client.get_object("snaps", "p/00000000000000000042", str(dest), T_S)
    assert dest.read_bytes() == b"replaced"

    assert client.delete_object("snaps", "p/00000000000000000042", T_S) is True
    assert client.delete_object("snaps", "p/00000000000000000042", T_S) is False
    assert [o.name for o in client.list_objects("snaps", T_S)] == ["p/00000000000000000043"]
    with pytest.raises(ObjectNotFound) as caught:
        client.get_object("snaps", "p/00000000000000000042", str(tmp_path / "gone"), T_S)
    assert isinstance(caught.value, KeyError)
    assert not (tmp_path / "gone").exists()
    stream = client.stream_info("OBJ_snaps", T_S)
    assert stream is not None  # only the live object's chunks (+ 2 metadata) remain
    assert stream["state"]["messages"] == info["chunks"] + 2


def test_an_empty_object_round_trips(client: Client, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    client.ensure_bucket("empties", 1, T_S)
    client.put_object("empties", "e", str(tmp_path / "empty"), "", T_S)
    client.get_object("empties", "e", str(tmp_path / "back"), T_S)
    assert (tmp_path / "back").read_bytes() == b""
    assert [(o.name, o.size) for o in client.list_objects("empties", T_S)] == [("e", 0)]


def test_an_objects_chunks_come_as_stored_and_a_changed_chunk_is_refused_at_the_end(
    client: Client, tmp_path: Path
) -> None:
    content = os.urandom(3 * 128 * 1024 + 77)  # 4 chunks
    (tmp_path / "src").write_bytes(content)
    client.ensure_bucket("tamper", 1, T_S)
    client.put_object("tamper", "t", str(tmp_path / "src"), "", T_S)
    assert b"".join(client.object_chunks("tamper", "t", T_S)) == content
    info = client.object_info("tamper", "t", T_S)
    subject = f"$O.tamper.C.{info['nuid']}"
    stored = list(client.messages("OBJ_tamper", subject, 1, T_S))
    assert [len(m.data) for m in stored] == [128 * 1024] * 3 + [77]

    # the first chunk replaced by other bytes of its size, at the end: the same
    # size and chunk count, another digest
    assert client.purge("OBJ_tamper", subject, stored[1].stream_seq, T_S) == 1
    client.publish(subject, bytes(128 * 1024), {}, T_S)
    got: list[bytes] = []
    with pytest.raises(ReplicationError) as failure:
        for chunk in client.object_chunks("tamper", "t", T_S):
            got.append(chunk)
    assert b"".join(got) == content[128 * 1024 :] + bytes(128 * 1024)  # all of it, then
    assert f"got {len(content)} bytes in 4 chunks, digest SHA-256=" in failure.value.reason
    assert f"its metadata says {len(content)} bytes in 4 chunks" in failure.value.reason
    with pytest.raises(ReplicationError, match="digest"):
        client.get_object("tamper", "t", str(tmp_path / "back"), T_S)
    assert not (tmp_path / "back").exists()

    # one chunk more: the size does not match
    client.publish(subject, b"x", {}, T_S)
    with pytest.raises(ReplicationError, match=f"got {len(content) + 1} bytes in 5 chunks"):
        list(client.object_chunks("tamper", "t", T_S))
    with pytest.raises(ObjectNotFound):
        client.object_chunks("tamper", "none", T_S)  # at the call, not when iterated


# ---------------------------------------------------------------- bounds


def test_a_refused_port_fails_within_the_timeout() -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ReplicationError, match="cannot connect") as caught:
        Client.get(f"nats://127.0.0.1:{port}", timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.5
    assert "ConnectionRefusedError" in caught.value.reason
    restored = pickle.loads(pickle.dumps(caught.value))
    assert (restored.stream, restored.partition, restored.reason) == ("", "", caught.value.reason)


def test_clients_are_shared_by_servers_and_options_and_closed_by_the_last_release(
    nats_server: NatsServer,
) -> None:
    first = Client.get(nats_server.url, timeout_s=T_S)
    second = Client.get([nats_server.url], timeout_s=T_S)
    other = Client.get(nats_server.url, timeout_s=T_S, connect_options={"name": "other"})
    try:
        assert first is second and first is not other
    finally:
        first.release()
        other.release()
    assert second.connected
    second.release()
    assert not second.connected
    with pytest.raises(ReplicationError, match="released"):
        second.stream_info("X", T_S)
    third = Client.get(nats_server.url, timeout_s=T_S)
    assert third is not first
    third.release()


def test_publishing_goes_on_across_a_broker_restart_without_loss_or_duplicate(
    nats_server: NatsServer,
) -> None:
    client = Client.get(nats_server.url, timeout_s=T_S)
    total = 200
    errors: list[str] = []
    done = threading.Event()

    def ship() -> None:
        # the shipper's protocol: id + expected seq; a 10071 whose stored copy
        # has our id is our own lost ack
        last = 0
        for i in range(total):
            msg_id = f"p:1:{i}"
            headers = {"Nats-Msg-Id": msg_id, "Nats-Expected-Last-Subject-Sequence": str(last)}
            deadline = time.monotonic() + 20.0
            while True:
                try:
                    last = client.publish("restart.p", b"%d" % i, headers, 0.5)
                    break
                except WrongLastSequence as exc:
                    assert exc.last_seq is not None
                    stored = client.message("RESTART", exc.last_seq, T_S)
                    assert stored is not None and stored.headers["Nats-Msg-Id"] == msg_id
                    last = exc.last_seq
                    break
                except ReplicationError as exc:
                    if time.monotonic() > deadline:
                        errors.append(str(exc))
                        return
                    time.sleep(0.05)
        done.set()

    try:
        client.ensure_stream("RESTART", ["restart.>"], 1, T_S)
        shipper = threading.Thread(target=ship)
        shipper.start()
        deadline = time.monotonic() + 10.0
        while (info := client.stream_info("RESTART", T_S)) and info["state"]["messages"] < 50:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        nats_server.restart()
        shipper.join(60.0)
        assert not errors and done.is_set()
        got = list(client.messages("RESTART", "restart.p", 1, T_S))
        assert [m.data for m in got] == [b"%d" % i for i in range(total)]
        assert client.disconnects >= 1 and client.reconnects >= 1
    finally:
        client.release()


def test_calls_work_from_a_thread_that_runs_its_own_asyncio_loop(client: Client) -> None:
    client.ensure_stream("LOOP", ["loop.>"], 1, T_S)
    results: list[object] = []

    async def faust_like() -> None:
        # a blocking call inside a running loop (as a Faust agent's store does)
        results.append(client.publish("loop.a", b"x", {}, T_S))
        await asyncio.sleep(0)
        results.append(client.last_message("LOOP", "loop.a", T_S))

    thread = threading.Thread(target=lambda: asyncio.run(faust_like()))
    thread.start()
    thread.join(20.0)
    assert not thread.is_alive()
    assert results[0] == 1
    assert isinstance(results[1], Message) and results[1].data == b"x"


def test_a_forked_child_cannot_use_its_parents_client_and_makes_its_own(
    client: Client, nats_server: NatsServer
) -> None:
    client.ensure_stream("FORK", ["fork.>"], 1, T_S)
    client.publish("fork.a", b"parent", {}, T_S)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(read_end)
            report: list[object] = []
            try:
                client.publish("fork.a", b"inherited", {}, T_S)
                report.append("inherited client worked")
            except ReplicationError as exc:
                report.append(exc.reason)
            own = Client.get(nats_server.url, timeout_s=T_S)
            report.append(own is not client)
            report.append(own.publish("fork.a", b"child", {}, T_S))
            own.release()
            client.release()  # the parent's: a no-op here
            os.write(write_end, pickle.dumps(report))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        deadline = time.monotonic() + 20.0
        chunks = []
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("the forked child hung")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    reason, distinct, seq = pickle.loads(b"".join(chunks))
    assert "forked from it" in str(reason)
    assert distinct is True and seq == 2
    assert client.publish("fork.a", b"parent again", {}, T_S) == 3  # the parent's is intact


def test_connect_options_reach_nats_connect_credentials_included(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, extra_config="authorization { token: s3cret }").start()
    try:
        started = time.monotonic()
        with pytest.raises(ReplicationError, match="cannot connect") as caught:
            Client.get(server.url, timeout_s=1.0)
        assert time.monotonic() - started < 2.5
        assert "uthorization" in caught.value.reason
        client = Client.get(server.url, timeout_s=T_S, connect_options={"token": "s3cret"})
        try:
            client.ensure_stream("AUTH", ["auth.>"], 1, T_S)
            assert client.publish("auth.a", b"x", {}, T_S) == 1
        finally:
            client.release()
    finally:
        server.kill()
