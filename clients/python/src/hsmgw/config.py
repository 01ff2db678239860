"""Where the gateway is and how to reach it: addresses, TLS and mutual TLS, API tokens."""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import stat
from dataclasses import dataclass
from typing import Optional, Union

from .errors import ConfigurationError

#: The most bytes read from a token file: tokens are 49 bytes; a larger file is not a token file
#: (the Swift tools' ``TokenFile.maximumByteCount``).
MAX_TOKEN_FILE_BYTES = 4096
#: The longest token accepted (printable ASCII); gateway tokens are 49 bytes.
MAX_API_TOKEN_BYTES = 256
#: The longest Unix socket path that fits ``sockaddr_un`` on Linux (108) and macOS (104).
MAX_UNIX_SOCKET_PATH_BYTES = 103
#: The ALPN protocol id a client may offer (protocol section 2).
ALPN_PROTOCOL = "hsmgw/1"
#: The shape of a gateway API token (protocol section 7.2).
API_TOKEN_PATTERN = re.compile(r"\Ahsmgw_[A-Za-z0-9_-]{43}\Z")


class APIToken:
    """An API token. Its ``str`` and ``repr`` never show it; :attr:`secret` does."""

    __slots__ = ("_secret",)

    def __init__(self, secret: str) -> None:
        secret = secret.strip()
        if not secret:
            raise ConfigurationError("the API token is empty")
        if len(secret.encode("utf-8")) > MAX_API_TOKEN_BYTES or not all(0x21 <= ord(c) <= 0x7E for c in secret):
            raise ConfigurationError(
                "an API token is printable ASCII without spaces, at most %d bytes" % MAX_API_TOKEN_BYTES
            )
        self._secret = secret

    @property
    def secret(self) -> str:
        return self._secret

    @property
    def has_gateway_shape(self) -> bool:
        """Whether it looks like a gateway token: ``hsmgw_`` and 43 base64url characters."""
        return bool(API_TOKEN_PATTERN.match(self._secret))

    def __repr__(self) -> str:
        return "APIToken(<redacted>)"

    __str__ = __repr__

    @classmethod
    def from_file(cls, path: Union[str, "os.PathLike[str]"]) -> "APIToken":
        """The token in a file only its owner can use, as the Swift tools require: a regular file
        (symbolic links followed) with no permission for group or others (``chmod 600``), of at
        most 4 KiB; surrounding whitespace is ignored."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
        except OSError as error:
            raise ConfigurationError("cannot open token file %s: %s" % (path, error.strerror)) from None
        try:
            # fstat on the open descriptor: the checked file is the one read.
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ConfigurationError("token file %s is not a regular file" % path)
            mode = stat.S_IMODE(info.st_mode)
            if mode & 0o077:
                raise ConfigurationError(
                    "token file %s has mode %04o: it must not be readable or writable by group or others "
                    "(the token is a password); run `chmod 600 %s`" % (path, mode, path)
                )
            data = b""
            while len(data) <= MAX_TOKEN_FILE_BYTES:
                chunk = os.read(fd, 1024)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        if len(data) > MAX_TOKEN_FILE_BYTES:
            raise ConfigurationError("token file %s is larger than %d bytes" % (path, MAX_TOKEN_FILE_BYTES))
        try:
            return cls(data.decode("utf-8"))
        except (UnicodeDecodeError, ConfigurationError):
            raise ConfigurationError(
                "token file %s does not hold one token (printable ASCII without spaces)" % path
            ) from None


@dataclass(frozen=True)
class TLSConfig:
    """TLS to the gateway (1.2 or 1.3; the server verified and its name checked).

    ``ca_file``: PEM CA certificates to trust (the system's trust store when None).
    ``server_name``: the name to verify in the server's certificate (default: the host).
    ``cert_file`` / ``key_file``: a client certificate chain and key for mutual TLS (the
    certificate must carry ``extendedKeyUsage=clientAuth``, protocol section 7.3).
    """

    ca_file: Optional[str] = None
    server_name: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None

    def ssl_context(self) -> ssl.SSLContext:
        if self.key_file is not None and self.cert_file is None:
            raise ConfigurationError("a client key needs its certificate (cert_file)")
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        except (OSError, ssl.SSLError) as error:
            raise ConfigurationError("cannot load CA file %s: %s" % (self.ca_file, error)) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # TLS 1.2: only ECDHE with AEAD ciphers (protocol section 2).
        context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
        context.set_alpn_protocols([ALPN_PROTOCOL])
        if self.cert_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as error:
                raise ConfigurationError("cannot load client certificate %s: %s" % (self.cert_file, error)) from None
        return context


@dataclass(frozen=True)
class Target:
    """A gateway address: a host and port, or a Unix socket path."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    @classmethod
    def parse(cls, address: str) -> "Target":
        """``host:port``, ``[v6]:port`` or ``unix:/path``."""
        if address.startswith("unix:"):
            path = address[len("unix:") :]
            if not path or len(path.encode("utf-8")) > MAX_UNIX_SOCKET_PATH_BYTES or "\0" in path:
                raise ConfigurationError(
                    "a Unix socket path is 1 to %d bytes (the size of sockaddr_un)" % MAX_UNIX_SOCKET_PATH_BYTES
                )
            return cls(unix_path=path)
        if address.startswith("["):
            host, _, port = address[1:].partition("]:")
        else:
            host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError("address must be HOST:PORT, [V6]:PORT or unix:PATH, not %r" % address)
        return cls(host=host, port=int(port))

    @property
    def is_local(self) -> bool:
        """A Unix socket or a loopback address (where the server allows plaintext)."""
        if self.unix_path:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.unix_path:
            return "unix:" + self.unix_path
        return "[%s]:%d" % (self.host, self.port) if ":" in self.host else "%s:%d" % (self.host, self.port)
