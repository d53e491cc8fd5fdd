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

Certificates rotate without a restart: the files are looked at again (at most once a second) when a
connection arrives or a call opens a channel, and read again when they changed on disk. A port serves
the new certificate from its next handshake; a process's calls present the new one, and trust the new
roots, from the next channel they open (the proxy reopens its workers' channels at its next health
check). Files that changed but do not fit together (a rotation half-way: a new certificate beside the
old key) are not used: the previous certificate stays in service, with a warning, until they do.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field

import grpc

SYSTEM = "system"  # ca_file: trust the system's root certificates
# How often the files may be looked at again: a stat of each per second, however many connections arrive.
RECHECK_S = 1.0

log = logging.getLogger(__name__)


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


def _read_all(cert_file: str | None, key_file: str | None, ca_file: str | None,
              client_ca_file: str | None) -> dict[str, bytes]:
    """The named files' bytes by role (cert, key, ca, client_ca), each checked; raises ``TlsConfigError``."""
    pem = {}
    if cert_file and key_file:
        pem["cert"] = _read(cert_file, "tls_cert_file")
        pem["key"] = _read(key_file, "tls_key_file")
        try:  # the standard library tells a key that does not belong to its certificate at once
            # (An empty password: an encrypted key fails here instead of prompting on a terminal.)
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=lambda: b"")
        except ssl.SSLError as exc:
            raise TlsConfigError(f"tls_key_file {key_file!r} is not the private key of tls_cert_file "
                                 f"{cert_file!r}, is encrypted (give an unencrypted PEM key), or one of "
                                 f"them is damaged: {exc.reason or exc}") from exc
    for role, path, setting in (("ca", ca_file, "tls_ca_file"), ("client_ca", client_ca_file, "tls_client_ca_file")):
        if not path or path == SYSTEM and role == "ca":
            continue
        pem[role] = _read(path, setting)
        try:
            ssl.create_default_context(cafile=path)
        except ssl.SSLError as exc:
            raise TlsConfigError(f"{setting}: {path!r} holds no usable certificate: {exc.reason or exc}") from exc
    return pem


class _Files:
    """The files of one config as last read whole and sound, read again when any of them changes on disk.

    gRPC asks from its own threads (before each handshake), the event loop from its thread: one lock."""

    def __init__(self, paths: tuple[str | None, ...]) -> None:
        self.paths = paths
        self.pem: dict[str, bytes] = {}
        self.version = 0          # 1 once read; +1 for each change taken
        self._stamp: tuple | None = None
        self._refused: tuple | None = None  # a changed state that did not fit: warned about once
        self._looked_at = 0.0
        self._lock = threading.Lock()

    def _current_stamp(self) -> tuple:
        stamp = []
        for path in self.paths:
            try:  # (os.stat follows links: a mounted secret swapped by renaming a link counts as a change)
                st = os.stat(path) if path and path != SYSTEM else None
            except OSError:
                st = None
            stamp.append(None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def load(self) -> None:
        """Read every file now (raises ``TlsConfigError``): a process's start."""
        with self._lock:
            stamp = self._current_stamp()
            self.pem = _read_all(*self.paths)
            self._stamp, self._looked_at, self.version = stamp, time.monotonic(), self.version + 1

    def current(self) -> tuple[int, dict[str, bytes]]:
        """The version and bytes to use now (after ``load``), after a look at the files if the last one is a
        second old."""
        with self._lock:
            now = time.monotonic()
            if now - self._looked_at >= RECHECK_S:
                self._looked_at = now
                stamp = self._current_stamp()
                if stamp != self._stamp and stamp != self._refused:
                    self._take(stamp)
            return self.version, self.pem

    def _take(self, stamp: tuple) -> None:
        try:
            pem = _read_all(*self.paths)
        except TlsConfigError as exc:
            self._refused = stamp
            log.warning("TLS files changed but cannot be used yet (%s): the previous certificate stays in "
                        "service until they fit together", exc)
            return
        self.pem, self._stamp, self._refused, self.version = pem, stamp, None, self.version + 1
        log.info("TLS files changed on disk: now serving and calling with version %d", self.version)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    client_ca_file: str | None = None
    # The files' bytes as last read (gRPC takes PEM as bytes, not paths), read again when they change.
    # Not an init field: dataclasses.replace() gives a new config its own.
    _files: _Files = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_files", _Files((self.cert_file, self.key_file, self.ca_file, self.client_ca_file)))

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
        self._files.load()
        return self

    def _current(self) -> tuple[int, dict[str, bytes]]:
        if not self._files.version:
            self.check()  # (the pairing rules first: a config used without a check still gets them)
        return self._files.current()

    @property
    def version(self) -> int:
        """Goes up each time changed files are taken: a holder of long-lived channels reopens them then."""
        return self._current()[0]

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials for this process's ports, which take changed files at the next handshake; None:
        plaintext."""
        if not self.serves:
            return None
        version, pem = self._current()
        served = [version]

        def changed() -> grpc.ServerCertificateConfiguration | None:
            # gRPC asks before every handshake; None keeps what it has. It must never raise into gRPC.
            try:
                version, pem = self._files.current()
            except Exception:
                log.exception("cannot look at the TLS files")
                return None
            if version == served[0]:
                return None
            served[0] = version
            return _server_configuration(pem)

        return grpc.dynamic_ssl_server_credentials(_server_configuration(pem), changed,
                                                   require_client_authentication=bool(self.client_ca_file))

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials for this process's calls to its peers, as the files are now; None: plaintext."""
        if not self.calls_securely:
            return None
        _, pem = self._current()
        return grpc.ssl_channel_credentials(root_certificates=pem.get("ca"), private_key=pem.get("key"),
                                            certificate_chain=pem.get("cert"))

    @property
    def scheme(self) -> str:
        """How this process's ports are reached, for its log lines."""
        return "TLS" if self.serves else "plaintext"


def _server_configuration(pem: dict[str, bytes]) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(pem["key"], pem["cert"])],
                                                     root_certificates=pem.get("client_ca"))


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
