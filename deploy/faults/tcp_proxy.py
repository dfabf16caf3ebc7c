#!/usr/bin/env python3
"""A fault-injecting TCP proxy for the Ferry fault suite (deploy/faults/run.sh).

Listens on 127.0.0.1 (port 0: a free one, written to --port-file once listening) and forwards
every connection to --target HOST:PORT.

  SIGUSR1  cut: reset every proxied connection (both sides) and stop listening, so that new
           connections are refused, until SIGUSR2
  SIGUSR2  restore: listen again on the same port
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
    def __init__(self, port, target_host, target_port):
        self.port = port
        self.target = (target_host, target_port)
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
        try:
            u_reader, u_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), timeout=5
            )
        except (OSError, asyncio.TimeoutError):
            reset(c_writer)
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

    def do_cut(self):
        self.cut = True
        if self.server is not None:
            self.server.close()
            self.server = None
        n = len(self.conns)
        for c, u in list(self.conns):
            reset(c)
            reset(u)
        self.conns.clear()
        log(f"cut: reset {n} connection(s), not listening on {self.port}")

    async def do_restore(self):
        if self.server is None:
            await self.listen()
        self.cut = False
        log(f"restored: listening on 127.0.0.1:{self.port}")


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--target", required=True, help="HOST:PORT (loopback)")
    args = ap.parse_args()
    host, _, port = args.target.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("tcp_proxy: the target must be on loopback")
    proxy = Proxy(args.listen_port, host, int(port))
    await proxy.listen()
    with open(args.port_file + ".tmp", "w") as f:
        f.write(f"{proxy.port}\n")
    os.replace(args.port_file + ".tmp", args.port_file)
    log(f"listening on 127.0.0.1:{proxy.port}, forwarding to {args.target}")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, proxy.do_cut)
    loop.add_signal_handler(
        signal.SIGUSR2, lambda: asyncio.ensure_future(proxy.do_restore())
    )
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    proxy.do_cut()
    log("exiting")


if __name__ == "__main__":
    asyncio.run(main())
