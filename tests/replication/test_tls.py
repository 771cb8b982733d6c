"""The changelog over TLS, on a real nats-server that requires it.

The certificates are made for the test with the ``openssl`` command (a CA,
and a server certificate it signed for 127.0.0.1); the server's ``tls``
block makes every client connection TLS. ``connect_options={"tls": context}``
reaches ``nats.connect`` from the changelog, from ``restore()`` and from the
client: a store replicates through it and is restored from it, and a
client that does not trust the CA is refused with a ``ReplicationError``
that says why.

    python -m pytest tests/replication/test_tls.py -q
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from logstate import InMemoryStorage, LocalFileStorage, ReplicationError
from logstate.replication import JetStreamChangelog, restore
from logstate.replication._client import Client
from tests.replication.servers import NatsServer

T_S = 10.0


class Certs(NamedTuple):
    ca: Path
    cert: Path
    key: Path


def openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    assert binary is not None, "the openssl command is needed to make the test's certificates"
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(directory: Path) -> Certs:
    """A CA, and a server certificate for 127.0.0.1 signed by it (a day long)."""
    directory.mkdir()
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=logstate test CA",
        cwd=directory,
    )  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=directory,
    )  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.cnf", "-out", "server.pem",
        cwd=directory,
    )  # fmt: skip
    return Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key")


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


@pytest.fixture
def tls_server(tmp_path: Path, certs: Certs) -> Iterator[NatsServer]:
    server = NatsServer(
        tmp_path / "nats",
        extra_config=f'tls {{ cert_file: "{certs.cert}", key_file: "{certs.key}" }}',
    ).start()
    try:
        yield server
    finally:
        server.kill()


def trusting(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca))


def test_a_store_replicates_and_restores_through_a_server_that_requires_tls(
    tmp_path: Path, tls_server: NatsServer, certs: Certs
) -> None:
    options = {"tls": trusting(certs)}
    changelog = JetStreamChangelog(
        tls_server.url, "TLS", "p0", ack="sync", timeout=T_S, connect_options=options
    )
    store = LocalFileStorage(tmp_path / "store", changelog=changelog)
    store.set("plain", b"v1")
    memory = InMemoryStorage(store)
    memory["counter"] = 41
    memory.flush(checkpoint={"offset": 7})
    assert store.replication_lag().groups == 0  # (ack="sync": acknowledged on return)
    store.close()

    result = restore(
        tls_server.url, "TLS", "p0", tmp_path / "copy", timeout=T_S, connect_options=options
    )
    assert result.records >= 2
    with LocalFileStorage(tmp_path / "copy", read_only=True) as copy:
        assert (copy.get("plain"), copy.get("counter"), copy.checkpoint) == (
            b"v1",
            41,
            {"offset": 7},
        )


@pytest.mark.parametrize(
    "options",
    [
        {},  # (nats-py then takes TLS up, as the server requires, with the system's CAs)
        {"tls": ssl.create_default_context()},
    ],
    ids=["no-tls-options", "system-cas"],
)
def test_a_client_that_does_not_trust_the_servers_ca_is_refused_with_the_reason(
    tls_server: NatsServer, options: dict[str, object]
) -> None:
    with pytest.raises(ReplicationError, match="cannot connect") as caught:
        Client.get(tls_server.url, timeout_s=2.0, connect_options=options)
    assert "certificate verify failed" in caught.value.reason
