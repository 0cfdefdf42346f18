"""`cluster.processes.free_port`: a port for a server that binds it later (`make run` binds its
HTTP port minutes after it was picked, once its cluster is up). A port from the kernel's
ephemeral range could be handed to another process's connection or port-0 listener meanwhile
(a fresh-clone run here: `make run`'s HAProxy "cannot bind socket (Address already in use)"), so
the port comes from below that range (above it, Ray's nodes pick ports of their own at random)
and above Ray's worker ports."""

from __future__ import annotations

import socket

from cluster import processes
from cluster.processes import AVOID_PORTS, RAY_WORKER_PORTS, ephemeral_ports, free_port


def test_ports_come_from_outside_the_ephemeral_range_and_rays_worker_ports():
    eph = ephemeral_ports()
    ports = [free_port() for _ in range(200)]
    assert all(RAY_WORKER_PORTS.stop <= p < eph.start and p not in AVOID_PORTS for p in ports)
    assert len(set(ports)) > 150  # random: two test workers do not pick the same one
    with socket.socket() as s:  # and free
        s.bind(("127.0.0.1", ports[0]))


def test_a_port_in_use_is_never_handed_out():
    eph = ephemeral_ports()
    held = []
    try:  # hold every port but a few of a small range outside the ephemeral one
        span = range(eph.start - 40, eph.start) if eph.start - 40 >= RAY_WORKER_PORTS.stop else range(0)
        for port in span[:-3]:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
        taken = {s.getsockname()[1] for s in held}
        assert not taken & {free_port() for _ in range(300)}
    finally:
        for s in held:
            s.close()


def test_without_room_outside_the_ephemeral_range_the_kernel_chooses(monkeypatch):
    real = ephemeral_ports()
    monkeypatch.setattr(processes, "ephemeral_ports", lambda: range(1024, 65536))
    ports = {free_port() for _ in range(20)}
    assert all(p in real for p in ports) and not ports & AVOID_PORTS
