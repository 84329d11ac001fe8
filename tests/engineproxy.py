"""A unix socket in front of the Docker engine's, for tests: point a service at it with DOCKER_HOST,
then `cut()` it (the engine is gone: connections drop, new ones are refused) and `restore()` it,
without touching the engine that other tests share. `cut_attach_after` drops every attach stream
that many seconds after it opens while everything else keeps working (a flaky engine). `hang()`
keeps every connection open but passes no request on (a hung engine) until `restore()`."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

ENGINE_SOCKET = "/var/run/docker.sock"


class EngineProxy:
    def __init__(self, path: Path, upstream: str = ENGINE_SOCKET) -> None:
        self.path = path
        self.upstream = upstream
        self.cut_attach_after: float | None = None
        self.hung = False
        self._listener: socket.socket | None = None
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def start(self) -> EngineProxy:
        self.hung = False
        if self._listener is not None:  # restored from hanging: it still listens
            return self
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    restore = start

    def hang(self) -> None:
        self.hung = True

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _drop(listener)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with self._lock:
            live, self._live = self._live, set()
        for sock in live:
            _drop(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            first = client.recv(65536)
            while self.hung and first:  # a hung engine reads requests and never answers
                first = client.recv(65536)
            engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            engine.connect(self.upstream)
            engine.sendall(first)
        except OSError:
            _drop(client)
            return
        with self._lock:
            if self._listener is None:  # cut meanwhile
                _drop(client)
                _drop(engine)
                return
            self._live |= {client, engine}
        if self.cut_attach_after is not None and b"/attach" in first.split(b"\r\n", 1)[0]:
            for sock in (client, engine):
                threading.Timer(self.cut_attach_after, _drop, args=(sock,)).start()
        threading.Thread(target=_pump, args=(engine, client), daemon=True).start()
        _pump(client, engine, lambda: self.hung)


def _pump(src: socket.socket, dst: socket.socket, hung: Callable[[], bool] = lambda: False) -> None:
    while True:
        try:
            data = src.recv(65536)
            if not data:
                break
            if not hung():  # swallowed while hung: the request never reaches the engine
                dst.sendall(data)
        except OSError:
            break
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _drop(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
