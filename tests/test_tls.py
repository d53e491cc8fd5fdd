"""TLS on every port: settings checked at start, a real worker and proxy speaking mutual TLS to each
other and to clients (gRPC and HTTPS), and plaintext or unknown callers turned away."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import pathlib
import ssl
from dataclasses import dataclass

import grpc
import httpx
import pytest
from conftest import free_port, start, stop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from typer.testing import CliRunner

from quickdraft.proto.tls import SYSTEM, TlsConfig, TlsConfigError, add_port, aio_channel, sync_channel

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@dataclass(frozen=True)
class Pki:
    ca: str
    cert: str       # signed by ca, names localhost and 127.0.0.1
    key: str
    other_ca: str   # a second authority that signed nothing here

    def tls(self, **overrides) -> TlsConfig:
        """Serve with the certificate, trust the authority, ask callers for its certificates."""
        return TlsConfig(**{"cert_file": self.cert, "key_file": self.key, "ca_file": self.ca,
                            "client_ca_file": self.ca} | overrides)

    def env(self) -> dict[str, str]:
        return {"QUICKDRAFT_TLS_CERT_FILE": self.cert, "QUICKDRAFT_TLS_KEY_FILE": self.key,
                "QUICKDRAFT_TLS_CA_FILE": self.ca, "QUICKDRAFT_TLS_CLIENT_CA_FILE": self.ca}


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: pathlib.Path, *pems: bytes) -> str:
    path.write_bytes(b"".join(pems))
    return str(path)


def _authority(directory: pathlib.Path, label: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(label)).issuer_name(_name(label))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert, _write(directory / f"{label}.pem", cert.public_bytes(serialization.Encoding.PEM))


def make_pki(directory: pathlib.Path) -> Pki:
    ca_key, ca_cert, ca_file = _authority(directory, "qd-test-ca")
    _, _, other_file = _authority(directory, "qd-other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    # No extended key usage: one certificate serves a port and identifies its holder as a caller.
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Pki(
        ca=ca_file,
        cert=_write(directory / "node.pem", cert.public_bytes(serialization.Encoding.PEM)),
        key=_write(directory / "node.key", key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption())),
        other_ca=other_file,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- settings checked at start ------------------------------------------------------------------
def test_bad_tls_settings_are_refused_with_the_setting_named(pki, tmp_path):
    cases = [
        (TlsConfig(cert_file=pki.cert), "tls_cert_file and tls_key_file go together"),
        (TlsConfig(client_ca_file=pki.ca), "tls_client_ca_file asks callers for certificates"),
        (TlsConfig(cert_file=str(tmp_path / "absent.pem"), key_file=pki.key), "tls_cert_file: cannot read"),
        (TlsConfig(ca_file=_write(tmp_path / "notes.txt", b"not a certificate\n")), "tls_ca_file:"),
    ]
    other_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    cases.append((TlsConfig(cert_file=pki.cert, key_file=_write(tmp_path / "other.key", other_key)),
                  "is not the private key of tls_cert_file"))
    for config, expected in cases:
        with pytest.raises(TlsConfigError, match=expected):
            config.check()
    assert pki.tls().check().serves and pki.tls().calls_securely
    assert TlsConfig(ca_file=SYSTEM).check().channel_credentials() is not None
    assert TlsConfig().server_credentials() is None and TlsConfig().channel_credentials() is None


def test_the_cli_stops_before_serving_on_a_bad_tls_setting(pki, monkeypatch):
    from quickdraft.cli import app

    monkeypatch.setenv("QUICKDRAFT_TLS_CERT_FILE", pki.cert)  # and no key
    result = CliRunner().invoke(app, ["serve", "--grpc-port", str(free_port())])
    assert result.exit_code == 2
    assert "tls_key_file" in result.output


# -- a port served in process ------------------------------------------------------------------
async def _health_server(tls: TlsConfig) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = add_port(server, "127.0.0.1:0", tls.check())
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, f"127.0.0.1:{port}"


async def _check(address: str, tls: TlsConfig | None) -> grpc.StatusCode:
    async with aio_channel(address, tls) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def test_mutual_tls_admits_only_callers_the_authority_certified(pki):
    server, address = await _health_server(pki.tls())
    try:
        assert await _check(address, pki.tls()) == grpc.StatusCode.OK
        # Plaintext, an unknown server authority, and no client certificate are all turned away.
        assert await _check(address, None) == grpc.StatusCode.UNAVAILABLE
        assert await _check(address, TlsConfig(ca_file=pki.other_ca, cert_file=pki.cert, key_file=pki.key)) == \
            grpc.StatusCode.UNAVAILABLE
        assert await _check(address, TlsConfig(ca_file=pki.ca)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)
    server, address = await _health_server(pki.tls(client_ca_file=None))
    try:  # without client roots, plain TLS: a caller needs only to trust the server
        assert await _check(address, TlsConfig(ca_file=pki.ca)) == grpc.StatusCode.OK
        assert await _check(address, None) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def _info_code(pool) -> grpc.StatusCode:
    worker, = pool.workers
    try:
        return await _code(worker)
    finally:
        await worker.channel.close()


async def test_the_workers_quickdraft_up_starts_are_called_in_plaintext_the_others_over_tls(pki):
    from quickdraft.proxy.worker_pool import WorkerPool

    # A plaintext server on loopback, as `up`'s own workers are (it serves no Worker service: a call
    # that reaches it is UNIMPLEMENTED, one whose TLS handshake fails is UNAVAILABLE).
    server, address = await _health_server(TlsConfig())
    try:
        tls = pki.tls().check()
        local = WorkerPool.from_addresses([address], tls=tls, plaintext=[address])
        assert await _info_code(local) == grpc.StatusCode.UNIMPLEMENTED
        assert await _info_code(WorkerPool.from_addresses([address], tls=tls)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


# -- rotation without a restart ------------------------------------------------------------------
def _install(source: Pki, live: pathlib.Path) -> None:
    """Put source's certificate and key where a running process reads them, each by an atomic rename."""
    for src, name in ((source.cert, "node.pem"), (source.key, "node.key")):
        (live / f".{name}").write_bytes(pathlib.Path(src).read_bytes())
        os.replace(live / f".{name}", live / name)


@pytest.fixture
def rotation(tmp_path, monkeypatch) -> tuple[Pki, Pki, pathlib.Path]:
    """Two unrelated authorities with a certificate each; the first pair installed in a live folder; the
    files looked at on every use (instead of once a second)."""
    monkeypatch.setattr("quickdraft.proto.tls.RECHECK_S", 0.0)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    _install(old, live)
    return old, new, live


async def test_a_port_serves_a_rotated_certificate_from_its_next_handshake(rotation, caplog):
    old, new, live = rotation
    server, address = await _health_server(TlsConfig(cert_file=str(live / "node.pem"), key_file=str(live / "node.key")))
    try:
        assert await _check(address, TlsConfig(ca_file=old.ca)) == grpc.StatusCode.OK
        assert await _check(address, TlsConfig(ca_file=new.ca)) == grpc.StatusCode.UNAVAILABLE
        # Half-way through a rotation (the new certificate beside the old key) the old pair stays in service.
        (live / "node.pem").write_bytes(pathlib.Path(new.cert).read_bytes())
        assert await _check(address, TlsConfig(ca_file=old.ca)) == grpc.StatusCode.OK
        assert "cannot be used yet" in caplog.text and "tls_key_file" in caplog.text
        _install(new, live)
        assert await _check(address, TlsConfig(ca_file=new.ca)) == grpc.StatusCode.OK
        assert await _check(address, TlsConfig(ca_file=old.ca)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_the_proxy_calls_its_workers_with_a_rotated_client_certificate(rotation):
    from quickdraft.proxy.worker_pool import WorkerPool

    old, new, live = rotation
    # The "worker" serves the old authority's certificate and accepts only callers the new one certified
    # (it serves no Worker service: a call that reaches it is UNIMPLEMENTED, a refused handshake UNAVAILABLE).
    server, address = await _health_server(TlsConfig(cert_file=old.cert, key_file=old.key, client_ca_file=new.ca))
    pool = WorkerPool.from_addresses([address], tls=TlsConfig(cert_file=str(live / "node.pem"),
                                                              key_file=str(live / "node.key"), ca_file=old.ca).check())
    worker, = pool.workers
    try:
        assert await _code(worker) == grpc.StatusCode.UNAVAILABLE
        first = worker.channel
        _install(new, live)
        await pool.refresh()  # the proxy's health check: the channel is opened again with the new pair
        assert worker.channel is not first and await _code(worker) == grpc.StatusCode.UNIMPLEMENTED
        await pool.refresh()
        assert await _code(worker) == grpc.StatusCode.UNIMPLEMENTED  # (no change: the same channel)
    finally:
        await pool.close()
        await server.stop(None)


async def _code(worker) -> grpc.StatusCode:
    from quickdraft.proto import quickdraft_pb2 as pb

    try:
        await worker.stub.Info(pb.WorkerInfoRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_the_https_port_serves_a_rotated_certificate(rotation, monkeypatch):
    from quickdraft.proxy.http_api import _follow_rotation

    monkeypatch.setattr("quickdraft.proxy.http_api.RECHECK_S", 0.01)
    old, new, live = rotation
    tls = TlsConfig(cert_file=str(live / "node.pem"), key_file=str(live / "node.key")).check()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    following = asyncio.create_task(_follow_rotation(context, tls))
    try:
        assert await _handshake(port, old.ca) and not await _handshake(port, new.ca)
        _install(new, live)
        for _ in range(100):
            if await _handshake(port, new.ca):
                break
            await asyncio.sleep(0.02)
        assert await _handshake(port, new.ca) and not await _handshake(port, old.ca)
    finally:
        following.cancel()
        server.close()


async def _handshake(port: int, ca: str) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl.create_default_context(cafile=ca))
    except ssl.SSLError:
        return False
    writer.close()
    return True


# -- the real stack ------------------------------------------------------------------------------
def test_worker_and_proxy_speak_mutual_tls_end_to_end(pki, tmp_path, client):
    """A SmolLM2 worker registers with a proxy over TLS; the proxy verifies over TLS; clients reach
    the proxy's gRPC and HTTPS ports with the authority's certificate, and get the plaintext stack's
    output token for token."""
    from quickdraft.cli import wait_serving
    from quickdraft.client import QuickDraftClient

    worker_port, proxy_port, http_port = free_port(), free_port(), free_port()
    proxy = start(["serve", "--grpc-port", str(proxy_port), "--http-port", str(http_port)], tmp_path / "proxy.log",
                  env=pki.env())
    worker = start(["worker", "--model", "smollm2-135m", "--port", str(worker_port), "--threads", "1",
                    "--register", f"localhost:{proxy_port}", "--advertise", f"127.0.0.1:{worker_port}"],
                   tmp_path / "worker.log", env=pki.env())
    try:
        proxy_address = f"localhost:{proxy_port}"
        try:
            wait_serving(proxy_address, timeout=300, proc=proxy, tls=pki.tls())
        except Exception:
            raise AssertionError("the TLS stack did not become ready:\n"
                                 + (tmp_path / "proxy.log").read_text()[-3000:]
                                 + (tmp_path / "worker.log").read_text()[-3000:]) from None
        expected = client.generate(MESSAGES, max_tokens=24, seed=1)
        with QuickDraftClient(proxy_address, tls=pki.tls()) as secure:
            got = secure.generate(MESSAGES, max_tokens=24, seed=1)
        assert got.token_ids == expected.token_ids and got.text

        # The worker's own port answers only a caller with a certificate of the authority.
        with sync_channel(f"127.0.0.1:{worker_port}") as plain, pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with QuickDraftClient(proxy_address) as plain, pytest.raises(grpc.RpcError) as refused:
            plain.list_models(timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        # HTTPS, with the same client certificate.
        context = ssl.create_default_context(cafile=pki.ca)
        context.load_cert_chain(pki.cert, pki.key)
        reply = httpx.post(f"https://localhost:{http_port}/v1/chat/completions", verify=context, timeout=120,
                           json={"model": "auto", "messages": MESSAGES, "max_tokens": 24, "seed": 1})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected.text
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"https://localhost:{http_port}/v1/models", verify=ssl.create_default_context(cafile=pki.ca),
                      timeout=10)  # no client certificate
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://localhost:{http_port}/v1/models", timeout=10)
    finally:
        stop(worker)
        stop(proxy)
