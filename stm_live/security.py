"""Who may talk to whom: loopback only by default; CURVE with an allow-list for anything else.

Every socket stm-live binds goes through `bind`: a non-loopback endpoint is refused unless
CURVE is on (`security.curve`), in which case the socket becomes a CURVE server with the
keys in `security.keys_dir` and ZeroMQ's authenticator admits only clients whose public keys
are in `<keys_dir>/authorized/`. Every socket stm-live connects goes through `connect`, which
makes it a CURVE client with the client key pair and the server's public key when CURVE is on.
`stm-live keys` writes the key pairs (zmq.auth certificates).
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

SERVER, CLIENT, AUTHORIZED = "server", "client", "authorized"


class SecurityError(ValueError):
    """An endpoint or key setup that would expose the instrument."""


def is_loopback(endpoint: str) -> bool:
    """True for inproc/ipc endpoints and TCP endpoints on a loopback address or localhost."""
    transport, _, address = endpoint.partition("://")
    if transport in ("inproc", "ipc"):
        return True
    if transport != "tcp":
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def generate_keys(keys_dir: str | Path) -> dict[str, str]:
    """Server and client key pairs, and the client's public key in the allow-list directory."""
    keys = Path(keys_dir)
    (keys / AUTHORIZED).mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in (SERVER, CLIENT):
        public, secret = zmq.auth.create_certificates(str(keys), name)
        Path(secret).chmod(0o600)
        paths[f"{name}_public"], paths[f"{name}_secret"] = public, secret
    shutil.copy(paths["client_public"], keys / AUTHORIZED / "client.key")
    paths["authorized"] = str(keys / AUTHORIZED)
    return paths


@dataclass
class Security:
    """CURVE keys (when enabled) and the authenticators started for them, one per context."""

    keys_dir: Path | None = None
    _authenticators: dict[int, ThreadAuthenticator] = field(default_factory=dict)

    @property
    def curve(self) -> bool:
        return self.keys_dir is not None

    def _keys(self, name: str) -> tuple[bytes, bytes]:
        path = self.keys_dir / f"{name}.key_secret"
        if not path.exists():
            raise SecurityError(f"CURVE is on but {path} is missing; run `stm-live keys --dir {self.keys_dir}`")
        return zmq.auth.load_certificate(str(path))

    def bind(self, sock: zmq.Socket, endpoint: str) -> None:
        if not self.curve:
            if not is_loopback(endpoint):
                raise SecurityError(f"refusing to bind {endpoint}: not loopback, and CURVE is off "
                                    "(set [security] curve = true and run `stm-live keys`)")
            sock.bind(endpoint)
            return
        public, secret = self._keys(SERVER)
        key = id(sock.context)
        if key not in self._authenticators:
            authenticator = ThreadAuthenticator(sock.context)
            authenticator.start()
            authenticator.configure_curve(domain="*", location=str(self.keys_dir / AUTHORIZED))
            self._authenticators[key] = authenticator
        sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
        sock.bind(endpoint)

    def connect(self, sock: zmq.Socket, endpoint: str) -> None:
        if self.curve:
            public, secret = self._keys(CLIENT)
            server_public, _ = zmq.auth.load_certificate(str(self.keys_dir / f"{SERVER}.key"))
            sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, server_public
        sock.connect(endpoint)

    def close(self) -> None:
        for authenticator in self._authenticators.values():
            authenticator.stop()
        self._authenticators.clear()


LOOPBACK_ONLY = Security()


def from_settings(curve: bool, keys_dir: str) -> Security:
    return Security(Path(keys_dir)) if curve else Security()
