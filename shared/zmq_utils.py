"""ZMQ helpers: every process binds one PULL input and PUSHes to its peers' inputs."""

from __future__ import annotations

import os
from typing import TypeVar
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

# A context makes sockets of its own kind (plain or asyncio); the helpers return that kind.
_Socket = TypeVar("_Socket", bound=zmq.Socket)


def bind_address(addr: str) -> str:
    """The address to bind for an advertised address: tcp://host:port binds on all interfaces."""
    if addr.startswith("tcp://"):
        return f"tcp://*:{urlsplit(addr).port}"
    return addr


def _prepare_ipc(addr: str) -> None:
    if addr.startswith("ipc://"):
        path = addr[len("ipc://") :]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)


def _tune(sock: zmq.Socket) -> None:
    # Unbounded queues: backpressure is the gateway's job (429), never a silent drop here.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)


def pull_socket(ctx: zmq.Context[_Socket], addr: str) -> _Socket:
    """Bind this process's input."""
    _prepare_ipc(addr)
    sock = ctx.socket(zmq.PULL)
    _tune(sock)
    sock.bind(bind_address(addr))
    return sock


def push_socket(ctx: zmq.Context[_Socket], addr: str) -> _Socket:
    """Connect to a peer's input. Messages queue until the peer is up."""
    sock = ctx.socket(zmq.PUSH)
    _tune(sock)
    sock.connect(addr)
    return sock


def new_context() -> zmq.Context:
    return zmq.Context()


def new_async_context() -> zmq.asyncio.Context:
    return zmq.asyncio.Context()
