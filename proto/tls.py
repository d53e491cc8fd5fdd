"""TLS on QuickDraft's gRPC connections: which credentials a process serves with and calls with.

Every process has the same four settings, read as a ``TlsConfig``:

* ``cert_file`` and ``key_file``: the certificate chain and private key (PEM) the process's own ports
  serve (the proxy's gRPC and HTTP ports, a worker's gRPC port). A process that calls a peer which
  asks for a client certificate presents the same pair. Without them a port speaks plaintext.
* ``ca_file``: the roots (PEM) that certify the peers this process *calls*: a proxy its workers, a
  worker the proxies it registers with, a client the proxy. ``"system"`` trusts the system's roots.
  Without it those calls are plaintext.
* ``client_ca_file``: serving, accept only callers whose client certificate these roots sign (mutual
  TLS). Without it any caller may connect, as in plain TLS; tokens and API keys still apply.

gRPC checks that the certificate a peer serves names the host the caller dialled (its subject
alternative names), so a worker's certificate must name the host or IP address it advertises.

Everything is read when a ``TlsConfig`` is checked, at a process's start, so a missing file, a key
that does not belong to its certificate or a file that is not PEM stops the command with the
setting's name, not a connection that fails later.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import grpc

SYSTEM = "system"  # ca_file: trust the system's root certificates


class TlsConfigError(ValueError):
    """The TLS settings cannot be used as given (a file is missing, unreadable or does not fit)."""


def _read(path: str, setting: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TlsConfigError(f"{setting}: cannot read {path!r}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{setting}: {path!r} is not PEM (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    client_ca_file: str | None = None
    # The files' bytes, read once by check(); gRPC takes PEM as bytes, not paths.
    # Not an init field: dataclasses.replace() gives a new config its own, empty cache.
    _pem: dict[str, bytes] = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def serves(self) -> bool:
        """Whether this process's ports speak TLS."""
        return bool(self.cert_file)

    @property
    def calls_securely(self) -> bool:
        """Whether this process's calls to its peers use TLS."""
        return bool(self.ca_file)

    def check(self) -> TlsConfig:
        """Read and validate every file named; returns self. Raises ``TlsConfigError`` naming the setting."""
        if bool(self.cert_file) != bool(self.key_file):
            raise TlsConfigError("tls_cert_file and tls_key_file go together: set both (a certificate chain and "
                                 "its private key, PEM) or neither")
        if self.client_ca_file and not self.cert_file:
            raise TlsConfigError("tls_client_ca_file asks callers for certificates, which needs TLS: set "
                                 "tls_cert_file and tls_key_file too")
        pem = {}
        if self.cert_file and self.key_file:
            pem["cert"] = _read(self.cert_file, "tls_cert_file")
            pem["key"] = _read(self.key_file, "tls_key_file")
            try:  # the standard library tells a key that does not belong to its certificate at once
                # (An empty password: an encrypted key fails here instead of prompting on a terminal.)
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file,
                                                                        password=lambda: b"")
            except ssl.SSLError as exc:
                raise TlsConfigError(f"tls_key_file {self.key_file!r} is not the private key of tls_cert_file "
                                     f"{self.cert_file!r}, is encrypted (give an unencrypted PEM key), or one of "
                                     f"them is damaged: {exc.reason or exc}") from exc
        for key, path, setting in (("ca", self.ca_file, "tls_ca_file"),
                                   ("client_ca", self.client_ca_file, "tls_client_ca_file")):
            if not path or path == SYSTEM and key == "ca":
                continue
            pem[key] = _read(path, setting)
            try:
                ssl.create_default_context(cafile=path)
            except ssl.SSLError as exc:
                raise TlsConfigError(f"{setting}: {path!r} holds no usable certificate: {exc.reason or exc}") \
                    from exc
        self._pem.update(pem)  # the same keys for the same config: never seen half-empty
        return self

    def _loaded(self) -> dict[str, bytes]:
        if not self._pem:  # (a config that names no file reads nothing: checking it again is free)
            self.check()
        return self._pem

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials for this process's ports; None: plaintext."""
        if not self.serves:
            return None
        pem = self._loaded()
        return grpc.ssl_server_credentials([(pem["key"], pem["cert"])], root_certificates=pem.get("client_ca"),
                                           require_client_auth="client_ca" in pem)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials for this process's calls to its peers; None: plaintext."""
        if not self.calls_securely:
            return None
        pem = self._loaded()
        return grpc.ssl_channel_credentials(root_certificates=pem.get("ca"), private_key=pem.get("key"),
                                            certificate_chain=pem.get("cert"))

    @property
    def scheme(self) -> str:
        """How this process's ports are reached, for its log lines."""
        return "TLS" if self.serves else "plaintext"


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: TlsConfig | None) -> int:
    """Listen on ``address`` with ``tls``'s server credentials (plaintext without them); the bound port, 0 if
    it could not bind."""
    credentials = tls.server_credentials() if tls is not None else None
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def aio_channel(address: str, tls: TlsConfig | None = None, **kwargs) -> grpc.aio.Channel:
    """An asyncio channel to a peer, over TLS where ``tls`` calls securely (``kwargs``: options, interceptors)."""
    credentials = tls.channel_credentials() if tls is not None else None
    if credentials is None:
        return grpc.aio.insecure_channel(address, **kwargs)
    return grpc.aio.secure_channel(address, credentials, **kwargs)


def sync_channel(address: str, tls: TlsConfig | None = None, **kwargs) -> grpc.Channel:
    """The blocking counterpart of ``aio_channel``."""
    credentials = tls.channel_credentials() if tls is not None else None
    if credentials is None:
        return grpc.insecure_channel(address, **kwargs)
    return grpc.secure_channel(address, credentials, **kwargs)
