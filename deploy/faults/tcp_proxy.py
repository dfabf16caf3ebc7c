#!/usr/bin/env python3
"""A fault-injecting TCP proxy for the Ferry fault suite (deploy/faults/run.sh).

Listens on 127.0.0.1 (port 0: a free one, written to --port-file once listening) and forwards
every connection to --target HOST:PORT. With --target-file, the target can be switched: the file
holds HOST:PORT, read at start (if it exists) and on SIGHUP and SIGUSR2.

  SIGUSR1  cut: reset every proxied connection (both sides) and stop listening, so that new
           connections are refused, until SIGUSR2
  SIGUSR2  restore: re-read --target-file, listen again on the same port
  SIGHUP   switch: re-read --target-file and reset every proxied connection, so that the
           clients reconnect, to the new target
  SIGTERM  exit

Loopback only; standard library only (python3 >= 3.8).
"""

import argparse
import asyncio
import os
import signal
import socket
import struct
import sys
import time


def log(msg):
    print(f"{time.strftime('%H:%M:%S')} tcp_proxy: {msg}", flush=True)


def parse_target(text):
    """HOST:PORT on loopback, as (host, port)."""
    host, _, port = text.strip().rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the target must be on loopback, got {text.strip()!r}")
    return host, int(port)


def reset(writer):
    """Close a connection with a TCP RST (SO_LINGER 0), as a network fault would look."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class Proxy:
    def __init__(self, port, target, target_file):
        self.port = port
        self.target = target
        self.target_file = target_file
        self.server = None
        self.conns = set()  # (client writer, upstream writer) pairs
        self.cut = False

    async def listen(self):
        self.server = await asyncio.start_server(
            self.handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, c_reader, c_writer):
        if self.cut:
            reset(c_writer)
            return
        target = self.target
        try:
            u_reader, u_writer = await asyncio.wait_for(
                asyncio.open_connection(*target), timeout=5
            )
        except (OSError, asyncio.TimeoutError):
            reset(c_writer)
            return
        if self.cut or target != self.target:
            # Cut or switched while this one was connecting: it must not reach the old target.
            reset(c_writer)
            reset(u_writer)
            return
        pair = (c_writer, u_writer)
        self.conns.add(pair)
        try:
            await asyncio.gather(
                self.pipe(c_reader, u_writer), self.pipe(u_reader, c_writer)
            )
        finally:
            self.conns.discard(pair)
            for w in pair:
                w.transport.abort()

    @staticmethod
    async def pipe(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side ended: end the other too (a half-open Redis link helps no test).
            writer.transport.abort()

    def reset_all(self):
        n = len(self.conns)
        for c, u in list(self.conns):
            reset(c)
            reset(u)
        self.conns.clear()
        return n

    def read_target(self):
        """Takes the target from --target-file, if given and present."""
        if self.target_file is None or not os.path.exists(self.target_file):
            return
        try:
            with open(self.target_file) as f:
                self.target = parse_target(f.read())
        except (OSError, ValueError) as e:
            log(f"keeping target {self.target[0]}:{self.target[1]}: {e}")

    def do_cut(self):
        self.cut = True
        if self.server is not None:
            self.server.close()
            self.server = None
        n = self.reset_all()
        log(f"cut: reset {n} connection(s), not listening on {self.port}")

    async def do_restore(self):
        self.read_target()
        if self.server is None:
            await self.listen()
        self.cut = False
        log(f"restored: listening on 127.0.0.1:{self.port}, forwarding to {self.target[0]}:{self.target[1]}")

    def do_switch(self):
        self.read_target()
        n = self.reset_all()
        log(f"switched: reset {n} connection(s), forwarding to {self.target[0]}:{self.target[1]}")


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--target", required=True, help="HOST:PORT (loopback)")
    ap.add_argument("--target-file", help="a file holding HOST:PORT, read on SIGHUP and SIGUSR2")
    args = ap.parse_args()
    try:
        target = parse_target(args.target)
    except ValueError as e:
        sys.exit(f"tcp_proxy: {e}")
    proxy = Proxy(args.listen_port, target, args.target_file)
    proxy.read_target()
    await proxy.listen()
    with open(args.port_file + ".tmp", "w") as f:
        f.write(f"{proxy.port}\n")
    os.replace(args.port_file + ".tmp", args.port_file)
    log(f"listening on 127.0.0.1:{proxy.port}, forwarding to {proxy.target[0]}:{proxy.target[1]}")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, proxy.do_cut)
    loop.add_signal_handler(
        signal.SIGUSR2, lambda: asyncio.ensure_future(proxy.do_restore())
    )
    loop.add_signal_handler(signal.SIGHUP, proxy.do_switch)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    proxy.do_cut()
    log("exiting")


if __name__ == "__main__":
    asyncio.run(main())
