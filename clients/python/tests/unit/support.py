"""Shared pieces of the unit tests: the repository's documents and a scripted server end."""

from __future__ import annotations

import pathlib
import re
import socket
import threading
from typing import Dict, List

REPO_ROOT = pathlib.Path(__file__).resolve().parents[4]
PROTOCOL_MD = REPO_ROOT / "docs" / "protocol.md"
ENVELOPE_MD = REPO_ROOT / "docs" / "envelope-format.md"


def hex_blocks(path: pathlib.Path, marker: str) -> Dict[str, bytes]:
    """The ``<!-- MARKER: NAME -->`` hex blocks of a document."""
    text = path.read_text(encoding="utf-8")
    pattern = r"<!-- %s: ([a-z-]+) -->\n```hex\n(.*?)```" % marker
    return {m.group(1): bytes.fromhex(m.group(2)) for m in re.finditer(pattern, text, re.S)}


class ScriptedPeer:
    """The server end of a socket pair: the test writes the server's bytes and reads exactly
    what the client sent (waiting for the bytes, never sleeping for a guessed time)."""

    def __init__(self) -> None:
        self.server, self.client_socket = socket.socketpair()
        self.server.settimeout(5.0)

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.server.sendall(chunk)

    def receive(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.server.recv(count - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.server.close()


class ScriptedTCPServer:
    """A TCP listener on loopback whose connections are handled by ``handler(sock, index)`` in
    threads; for tests of the client's pool, retries and deadlines."""

    def __init__(self, handler) -> None:  # type: ignore[no-untyped-def]
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.handler = handler
        self.accepted = 0
        self.threads: List[threading.Thread] = []
        self.sockets: List[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            index = self.accepted
            self.accepted += 1
            self.sockets.append(sock)
            thread = threading.Thread(target=self._run, args=(sock, index), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, sock: socket.socket, index: int) -> None:
        try:
            self.handler(sock, index)
        except OSError:
            pass
        finally:
            sock.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
