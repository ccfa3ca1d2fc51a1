"""A guard for tests with servers: any socket connection to a non-loopback address raises.

Installed in-process by tests/servers.py and in subprocesses by the `sitecustomize` beside this
file (put this folder on PYTHONPATH), so nothing a test runs can reach the network by mistake.
"""

from __future__ import annotations

import ipaddress
import socket

_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


class NonLoopbackConnection(OSError):
    pass


def _check(sock: socket.socket, address) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # unix sockets, socketpairs: local by construction
    host = address[0]
    try:
        addrs = [ipaddress.ip_address(host.split("%")[0])]
    except ValueError:  # a name: every address it resolves to must be loopback
        addrs = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(host, None)]
    if not all(a.is_loopback for a in addrs):
        raise NonLoopbackConnection(f"test guard: refusing a connection to non-loopback {host}")


def _guarded_connect(self, address):
    _check(self, address)
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


def install() -> None:
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex


def uninstall() -> None:
    socket.socket.connect = _connect
    socket.socket.connect_ex = _connect_ex
