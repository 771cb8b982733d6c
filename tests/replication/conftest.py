"""Fixtures of the replication tests: real nats-server processes and a cuttable proxy.

- ``nats_server``: one server (JetStream on) in the test's ``tmp_path``, per test;
- ``nats_cluster``: a 3-node cluster per test module (give each test its own
  stream name);
- ``tcp_proxy``: a factory of :class:`TcpProxy` to a port, closed at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.replication.servers import NatsCluster, NatsServer, TcpProxy


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path_factory.mktemp("nats-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.kill()


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[int], TcpProxy]]:
    made: list[TcpProxy] = []

    def make(target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_port)
        made.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in made:
            proxy.close()
