"""The test servers themselves: real nats-server processes, a proxy that cuts, a cluster.

Each test exercises one promise of ``tests/replication/servers.py`` against
the real binary: a publish is acked through the proxy; a cut makes a request
fail and a heal makes the next one work; a restart keeps a stream's
messages; an R3 stream survives SIGKILL of its leader; a paused server stops
answering and answers again once resumed; a failed start raises with the
server's log.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from logstate._errors import ReplicationError
from logstate.replication._client import Client
from tests.replication.servers import (
    NatsCluster,
    NatsServer,
    ServerStartError,
    TcpProxy,
    free_port,
)

T_S = 5.0


def test_free_port_is_a_bindable_loopback_port() -> None:
    port = free_port()
    assert 1024 <= port <= 65535


def test_a_server_starts_on_loopback_with_jetstream_and_reports_its_limits(
    nats_server: NatsServer,
) -> None:
    varz = nats_server.monitor("/varz")
    assert varz["host"] == "127.0.0.1"
    assert varz["port"] == nats_server.port
    assert varz["jetstream"]["config"]["store_dir"] == str(nats_server.store_dir)
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"


def test_publish_through_the_proxy_is_acked_and_a_cut_fails_a_request_until_healed(
    nats_server: NatsServer, tcp_proxy: Callable[[int], TcpProxy]
) -> None:
    proxy = tcp_proxy(nats_server.port)
    client = Client.get(proxy.url, timeout_s=T_S)
    try:
        client.ensure_stream("PROXY", ["proxy.>"], 1, T_S)
        assert client.publish("proxy.a", b"one", {}, T_S) == 1

        proxy.cut()
        with pytest.raises(ReplicationError):
            client.publish("proxy.a", b"two", {"Nats-Msg-Id": "two"}, 1.0)

        proxy.heal()
        deadline = time.monotonic() + 10.0
        while True:  # the client reconnects in the background (every 0.5 s)
            try:
                seq = client.publish("proxy.a", b"two", {"Nats-Msg-Id": "two"}, 1.0)
                break
            except ReplicationError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        # "two" may have been buffered during the cut and sent at reconnect:
        # the message id makes the retry a duplicate of it, never a second copy
        assert seq == 2
        info = client.stream_info("PROXY", T_S)
        assert info is not None
        assert info["state"]["messages"] == 2
        assert proxy.accepted >= 2
    finally:
        client.release()


def test_a_restarted_server_keeps_its_streams(nats_server: NatsServer) -> None:
    client = Client.get(nats_server.url, timeout_s=T_S)
    try:
        client.ensure_stream("KEEP", ["keep.>"], 1, T_S)
        for i in range(3):
            client.publish("keep.a", b"%d" % i, {}, T_S)
    finally:
        client.release()
    port, pid = nats_server.port, nats_server.pid
    nats_server.restart()
    assert nats_server.port == port and nats_server.pid != pid
    client = Client.get(nats_server.url, timeout_s=T_S)
    try:
        info = client.stream_info("KEEP", T_S)
        assert info is not None
        assert info["state"]["messages"] == 3
    finally:
        client.release()


def test_a_paused_server_does_not_answer_and_answers_again_once_resumed(
    nats_server: NatsServer,
) -> None:
    client = Client.get(nats_server.url, timeout_s=T_S)
    try:
        client.ensure_stream("PAUSE", ["pause.>"], 1, T_S)
        nats_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(ReplicationError, match=r"no answer within 0\.5 s"):
                client.publish("pause.a", b"x", {"Nats-Msg-Id": "x"}, 0.5)
            assert time.monotonic() - started < 3.0
        finally:
            nats_server.resume()
        assert client.publish("pause.a", b"x", {"Nats-Msg-Id": "x"}, T_S) == 1
    finally:
        client.release()


def test_a_server_that_cannot_start_raises_with_its_log(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, extra_config="this is { not a config")
    with pytest.raises(ServerStartError, match="exited"):
        server.start()
    assert not server.running


def test_an_r3_stream_survives_sigkill_of_its_leader(nats_cluster: NatsCluster) -> None:
    stream = "SURVIVE"
    client = Client.get(nats_cluster.urls, timeout_s=T_S)
    try:
        client.ensure_stream(stream, ["survive.>"], 3, T_S)
        for i in range(5):
            client.publish("survive.a", b"%d" % i, {"Nats-Msg-Id": f"m{i}"}, T_S)
        leader = nats_cluster.stream_leader(stream)
        leader.kill()
        try:
            deadline = time.monotonic() + 20.0
            while True:  # a new leader is elected among the two left
                try:
                    seq = client.publish("survive.a", b"5", {"Nats-Msg-Id": "m5"}, 1.0)
                    break
                except ReplicationError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            assert seq == 6
            new_leader = nats_cluster.stream_leader(stream)
            assert new_leader is not leader
            got = list(client.messages(stream, "survive.a", 1, T_S))
            assert [m.data for m in got] == [b"%d" % i for i in range(6)]
        finally:
            leader.start()
            nats_cluster.start()  # waits until every member is healthy again
    finally:
        client.release()
    assert os.path.isdir(leader.store_dir)


def test_a_closed_proxy_refuses_connections_and_leaves_no_thread(
    nats_server: NatsServer,
) -> None:
    proxy = TcpProxy(nats_server.port)
    client = Client.get(proxy.url, timeout_s=T_S)
    try:
        assert client.stream_info("NONE", T_S) is None  # a round trip through it
    finally:
        client.release()
    proxy.close()
    assert not proxy._acceptor.is_alive()
    assert not any(t.is_alive() for t in proxy._threads)
    with pytest.raises(ReplicationError, match="cannot connect"):
        Client.get(proxy.url, timeout_s=0.5)
