#!/usr/bin/env python3
"""Independent JSON-mode client agent written from the AnyProxy API document.

This program implements the *client* side of the WebSocket protocol described
in the AnyProxy API document (JSON text frames ``{"type": ..., "data": {...}}``)
and nothing else.  It is meant for interop testing of a gateway.

Usage:
  doc_agent.py --url wss://127.0.0.1:PORT/ws --cafile CERT.pem \
      --username U --password P --client-id ID [--ping-interval 5] \
      [--deflate [--no-context-takeover] [--max-window-bits N]] [--fragment BYTES] \
      [--bomb BYTES]

``--deflate`` offers permessage-deflate (RFC 7692, websockets' own implementation);
``--fragment`` sends every message in WebSocket fragments of at most BYTES;
``--bomb`` sends, after authenticating, one highly compressible message of BYTES
bytes, prints ``CLOSED <code> <reason>`` when the gateway closes, and exits 0.

stdout: ``EXTENSIONS <negotiated Sec-WebSocket-Extensions or none>`` after the
handshake, ``AUTH_OK`` after a successful auth_response, or
``AUTH_FAILED <message>`` (exit code 2).  Diagnostics go to stderr.
Exit codes: 0 on SIGTERM/SIGINT, 2 on authentication failure, 1 on any other
failure (including losing the gateway connection after authentication).
"""

import argparse
import asyncio
import base64
import collections
import json
import signal
import socket
import ssl
import sys
import time

import websockets
from websockets.asyncio.client import connect as ws_connect
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

ERROR_CODES = {
    "AUTH_FAILED",
    "INVALID_MESSAGE",
    "CONNECTION_FAILED",
    "FORBIDDEN_HOST",
    "RATE_LIMITED",
    "INTERNAL_ERROR",
}

CHUNK = 32 * 1024  # max bytes read from a target per `data` message
QUEUE_MAX = 512  # per-connection queued gateway->target chunks (~16 MiB)
CONNECT_TIMEOUT = 10.0
AUTH_TIMEOUT = 15.0
RECENTLY_CLOSED_MAX = 8192

_CLOSE_SENTINEL = object()


def log(*args):
    print("[doc_agent]", *args, file=sys.stderr, flush=True)


def encode(msg_type, data):
    return json.dumps({"type": msg_type, "data": data}, separators=(",", ":"))


def failure_message(exc, host, port):
    """Map a connect exception to the project's prefixed failure message."""
    where = f"{host}:{port}"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"timeout: connecting to {where} timed out after {CONNECT_TIMEOUT:g}s"
    if isinstance(exc, socket.gaierror):
        return f"dns: cannot resolve {host}: {exc}"
    if isinstance(exc, ConnectionRefusedError):
        return f"refused: {where}: {exc}"
    if isinstance(exc, OSError):
        return f"unreachable: {where}: {exc}"
    return f"unreachable: {where}: {type(exc).__name__}: {exc}"


class Conn:
    """One proxied TCP connection (identified by the gateway's connection_id)."""

    def __init__(self, cid):
        self.cid = cid
        self.queue = asyncio.Queue(maxsize=QUEUE_MAX)  # gateway -> target
        self.reader = None
        self.writer = None
        self.closed = False  # no more messages must be sent for this id
        self.tasks = []
        self.connect_task = None
        self.udp = None  # a datagram transport, for a `protocol: "udp"` connect


class UdpFlow(asyncio.DatagramProtocol):
    """A `protocol: "udp"` connection: each datagram from the target is one `data`."""

    def __init__(self, agent, conn):
        self.agent = agent
        self.conn = conn

    def datagram_received(self, datagram, addr):
        if not self.conn.closed:
            self.agent.spawn(self.agent.send_quiet(
                "data",
                {"connection_id": self.conn.cid, "payload": base64.b64encode(datagram).decode("ascii")},
            ))

    def error_received(self, exc):
        pass  # an ICMP error for an earlier datagram: UDP carries on


class Agent:
    def __init__(self, args):
        self.args = args
        self.ws = None
        self.send_lock = asyncio.Lock()
        self.conns = {}
        self.recently_closed = collections.OrderedDict()
        self.stop = asyncio.Event()
        self.bg_tasks = set()

    # ------------------------------------------------------------------ send
    async def send(self, msg_type, data):
        text = encode(msg_type, data)
        size = self.args.fragment
        async with self.send_lock:
            if size and len(text) > size:
                # An iterable makes websockets send one message in several frames.
                await self.ws.send(text[i:i + size] for i in range(0, len(text), size))
            else:
                await self.ws.send(text)

    async def send_quiet(self, msg_type, data):
        try:
            await self.send(msg_type, data)
            return True
        except websockets.ConnectionClosed:
            return False

    def spawn(self, coro):
        t = asyncio.ensure_future(coro)
        self.bg_tasks.add(t)
        t.add_done_callback(self.bg_tasks.discard)
        return t

    def forget(self, conn):
        if self.conns.get(conn.cid) is conn:
            del self.conns[conn.cid]
            self.recently_closed[conn.cid] = True
            while len(self.recently_closed) > RECENTLY_CLOSED_MAX:
                self.recently_closed.popitem(last=False)

    # ------------------------------------------------------------------ auth
    async def authenticate(self):
        a = self.args
        await self.send(
            "auth",
            {"username": a.username, "password": a.password, "client_id": a.client_id},
        )
        auth_error = None
        deadline = time.monotonic() + AUTH_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no auth_response within %gs" % AUTH_TIMEOUT)
            try:
                raw = await asyncio.wait_for(self.ws.recv(), remaining)
            except websockets.ConnectionClosed as e:
                if auth_error is not None:
                    return False, auth_error
                raise ConnectionError(f"connection closed before auth_response: {e}")
            try:
                msg = json.loads(raw)
                mtype, data = msg["type"], msg["data"]
            except Exception:
                log("invalid message while waiting for auth_response:", repr(raw)[:200])
                continue
            if mtype == "auth_response":
                ok = data.get("success")
                message = data.get("message", "")
                if ok is True:
                    return True, message
                return False, message or auth_error or "authentication failed"
            if mtype == "error" and data.get("code") == "AUTH_FAILED":
                auth_error = data.get("message", "AUTH_FAILED")
                continue
            log("ignoring message before auth_response:", mtype)

    # -------------------------------------------------------------- dispatch
    async def run_session(self):
        ping_task = self.spawn(self.ping_loop())
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    log("unexpected binary frame from gateway, ignoring")
                    await self.send_quiet(
                        "error", {"code": "INVALID_MESSAGE", "message": "binary frame not supported"}
                    )
                    continue
                try:
                    msg = json.loads(raw)
                    if not isinstance(msg, dict):
                        raise ValueError("not an object")
                    mtype = msg["type"]
                    data = msg["data"]
                    if not isinstance(mtype, str) or not isinstance(data, dict):
                        raise ValueError("bad type/data")
                except Exception as e:
                    log("invalid message from gateway:", e, repr(raw)[:200])
                    await self.send_quiet(
                        "error", {"code": "INVALID_MESSAGE", "message": f"invalid message: {e}"}
                    )
                    continue
                await self.dispatch(mtype, data)
        finally:
            ping_task.cancel()

    async def dispatch(self, mtype, data):
        if mtype == "connect":
            self.on_connect(data)
        elif mtype == "data":
            await self.on_data(data)
        elif mtype == "close":
            self.on_close(data)
        elif mtype == "ping":
            ts = data.get("timestamp")
            await self.send_quiet("pong", {"timestamp": ts})
        elif mtype == "pong":
            pass  # heartbeat answer; nothing to do
        elif mtype == "error":
            log("gateway error:", json.dumps(data))
        elif mtype == "auth_response":
            log("unexpected extra auth_response:", json.dumps(data))
        else:
            log("unknown message type from gateway:", mtype)
            await self.send_quiet(
                "error", {"code": "INVALID_MESSAGE", "message": f"unknown message type {mtype!r}"}
            )

    # --------------------------------------------------------------- connect
    def on_connect(self, data):
        cid = data.get("connection_id")
        host = data.get("target_host")
        port = data.get("target_port")
        proto = data.get("protocol")
        problem = None
        if not isinstance(cid, str) or not cid:
            problem = "connect: connection_id must be a non-empty string"
        elif not isinstance(host, str) or not host:
            problem = "connect: target_host must be a non-empty string"
        elif not isinstance(port, int) or isinstance(port, bool) or not (0 < port < 65536):
            problem = "connect: target_port must be an integer in 1..65535"
        elif proto not in ("tcp", "udp"):
            problem = f"connect: unsupported protocol {proto!r}"
        elif cid in self.conns:
            problem = f"connect: connection_id {cid} already in use"
        if problem is not None:
            log(problem)
            err = {"code": "INVALID_MESSAGE", "message": problem}
            if isinstance(cid, str):
                err["connection_id"] = cid
            self.spawn(self._reject(cid if isinstance(cid, str) and cid not in self.conns else None, err))
            return
        conn = Conn(cid)
        self.conns[cid] = conn
        self.recently_closed.pop(cid, None)
        if proto == "udp":
            conn.connect_task = self.spawn(self.do_connect_udp(conn, host, port))
        else:
            conn.connect_task = self.spawn(self.do_connect(conn, host, port))

    async def do_connect_udp(self, conn, host, port):
        """The document's `connect` with `"protocol": "udp"`: a UDP socket toward the
        target; each `data` payload is one datagram, both ways."""
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: UdpFlow(self, conn), remote_addr=(host, port)
            )
        except Exception as e:
            self.forget(conn)
            conn.closed = True
            message = f"unreachable: {host}:{port}: {e}"
            if await self.send_quiet(
                "error", {"code": "CONNECTION_FAILED", "message": message, "connection_id": conn.cid}
            ):
                await self.send_quiet(
                    "connect_response", {"connection_id": conn.cid, "success": False, "message": message}
                )
            return
        if conn.closed:
            transport.close()
            return
        conn.udp = transport
        await self.send_quiet(
            "connect_response",
            {"connection_id": conn.cid, "success": True, "message": "UDP socket open"},
        )

    async def _reject(self, cid, err):
        if await self.send_quiet("error", err) and cid is not None:
            await self.send_quiet(
                "connect_response",
                {"connection_id": cid, "success": False, "message": err["message"]},
            )

    async def do_connect(self, conn, host, port):
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            message = failure_message(e, host, port)
            self.forget(conn)
            if conn.closed:
                return  # gateway already gave up on this connection
            conn.closed = True
            if await self.send_quiet(
                "error",
                {"code": "CONNECTION_FAILED", "message": message, "connection_id": conn.cid},
            ):
                await self.send_quiet(
                    "connect_response",
                    {"connection_id": conn.cid, "success": False, "message": message},
                )
            return
        if conn.closed:
            # gateway sent `close` while we were connecting
            writer.close()
            return
        conn.reader, conn.writer = reader, writer
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if not await self.send_quiet(
            "connect_response",
            {"connection_id": conn.cid, "success": True, "message": "Connection established"},
        ):
            writer.close()
            return
        conn.tasks.append(self.spawn(self.target_to_gateway(conn)))
        conn.tasks.append(self.spawn(self.gateway_to_target(conn)))

    # ------------------------------------------------------------------ relay
    async def target_to_gateway(self, conn):
        reason = "target closed connection"
        try:
            while not conn.closed:
                chunk = await conn.reader.read(CHUNK)
                if not chunk:
                    break
                if conn.closed:
                    return
                await self.send(
                    "data",
                    {"connection_id": conn.cid, "payload": base64.b64encode(chunk).decode("ascii")},
                )
        except websockets.ConnectionClosed:
            return
        except (OSError, ConnectionError) as e:
            reason = f"target read error: {e}"
        if conn.closed:
            return
        conn.closed = True
        self.forget(conn)
        await self.send_quiet("close", {"connection_id": conn.cid, "reason": reason})
        # Drop whatever was still queued for the target and close it.
        try:
            conn.queue.put_nowait(_CLOSE_SENTINEL)
        except asyncio.QueueFull:
            pass
        conn.writer.close()

    async def gateway_to_target(self, conn):
        try:
            while True:
                item = await conn.queue.get()
                if item is _CLOSE_SENTINEL:
                    break
                if conn.writer.is_closing():
                    break
                conn.writer.write(item)
                await conn.writer.drain()
        except (OSError, ConnectionError) as e:
            if not conn.closed:
                conn.closed = True
                self.forget(conn)
                await self.send_quiet(
                    "close", {"connection_id": conn.cid, "reason": f"target write error: {e}"}
                )
        finally:
            try:
                conn.writer.close()
            except Exception:
                pass

    async def on_data(self, data):
        cid = data.get("connection_id")
        payload = data.get("payload")
        if not isinstance(cid, str) or not isinstance(payload, str):
            await self.send_quiet(
                "error",
                {"code": "INVALID_MESSAGE", "message": "data: connection_id and payload must be strings"},
            )
            return
        conn = self.conns.get(cid)
        if conn is None or conn.closed:
            if cid in self.recently_closed or conn is not None:
                return  # in-flight data for a connection that just closed
            await self.send_quiet("close", {"connection_id": cid, "reason": "unknown connection"})
            return
        try:
            chunk = base64.b64decode(payload, validate=True)
        except Exception as e:
            await self.send_quiet(
                "error",
                {"code": "INVALID_MESSAGE", "message": f"data: invalid base64 payload: {e}", "connection_id": cid},
            )
            return
        if conn.udp is not None:
            conn.udp.sendto(chunk)  # one payload, one datagram (an empty one too)
            return
        if chunk:
            # Bounded queue: only when a single target falls >QUEUE_MAX chunks
            # behind does this await (and thus stall the session).
            await conn.queue.put(chunk)

    def on_close(self, data):
        cid = data.get("connection_id")
        conn = self.conns.get(cid) if isinstance(cid, str) else None
        if conn is None:
            return
        conn.closed = True
        self.forget(conn)
        if conn.udp is not None:
            conn.udp.close()
            return
        if conn.writer is None:
            return  # still connecting; do_connect will close the socket
        # Let the writer task flush everything queued before closing the target.
        self.spawn(conn.queue.put(_CLOSE_SENTINEL))

    # ------------------------------------------------------------------ ping
    async def ping_loop(self):
        interval = self.args.ping_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            if not await self.send_quiet("ping", {"timestamp": int(time.time())}):
                return

    # ------------------------------------------------------------------ main
    def close_all(self):
        for conn in list(self.conns.values()):
            conn.closed = True
            if conn.connect_task is not None:
                conn.connect_task.cancel()
            if conn.writer is not None:
                conn.writer.close()
            if conn.udp is not None:
                conn.udp.close()
        self.conns.clear()


async def amain(args):
    loop = asyncio.get_running_loop()
    agent = Agent(args)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop.set)

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED

    extensions = None
    if args.deflate:
        extensions = [
            ClientPerMessageDeflateFactory(
                server_no_context_takeover=args.no_context_takeover,
                client_no_context_takeover=args.no_context_takeover,
                server_max_window_bits=args.max_window_bits,
                client_max_window_bits=args.max_window_bits or True,
            )
        ]

    async def session():
        try:
            agent.ws = await ws_connect(
                args.url,
                ssl=ctx,
                compression=None,  # no subprotocol; extensions only as asked for
                extensions=extensions,
                max_size=64 * 1024 * 1024,
                ping_interval=None,  # heartbeat is done with the document's ping message
                open_timeout=15,
                close_timeout=5,
                proxy=None,
            )
        except Exception as e:
            log("cannot connect to gateway:", type(e).__name__, e)
            return 1
        negotiated = agent.ws.response.headers.get("Sec-WebSocket-Extensions")
        print(f"EXTENSIONS {negotiated or 'none'}", flush=True)
        try:
            ok, message = await agent.authenticate()
        except Exception as e:
            log("authentication did not complete:", type(e).__name__, e)
            return 1
        if not ok:
            print(f"AUTH_FAILED {message}", flush=True)
            return 2
        print("AUTH_OK", flush=True)
        if args.bomb:
            try:
                await agent.ws.send("0" * args.bomb)
                await asyncio.wait_for(agent.ws.wait_closed(), 30)
            except (websockets.ConnectionClosed, asyncio.TimeoutError):
                pass
            print(f"CLOSED {agent.ws.close_code} {agent.ws.close_reason}", flush=True)
            return 0
        try:
            await agent.run_session()
        except websockets.ConnectionClosed:
            pass
        log("gateway connection closed:", agent.ws.close_code, agent.ws.close_reason)
        return 1

    session_task = asyncio.ensure_future(session())
    stop_task = asyncio.ensure_future(agent.stop.wait())
    done, _ = await asyncio.wait({session_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if session_task in done:
        code = session_task.result()
        stop_task.cancel()
    else:
        code = 0
        session_task.cancel()
        if agent.ws is not None:
            try:
                await asyncio.wait_for(agent.ws.close(), 5)
            except Exception:
                pass
        try:
            await asyncio.wait_for(session_task, 5)
        except (asyncio.CancelledError, Exception):
            pass
    agent.close_all()
    for t in list(agent.bg_tasks):
        t.cancel()
    if agent.bg_tasks:
        await asyncio.wait(list(agent.bg_tasks), timeout=5)
    return code


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="wss://HOST:PORT/ws")
    p.add_argument("--cafile", required=True, help="PEM CA/cert used to verify the gateway")
    p.add_argument("--username", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--ping-interval", type=float, default=5.0, help="seconds between ping messages (0 = off)")
    p.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    p.add_argument("--no-context-takeover", action="store_true",
                   help="with --deflate: ask for no context takeover in both directions")
    p.add_argument("--max-window-bits", type=int, default=None,
                   help="with --deflate: offer server_max_window_bits/client_max_window_bits")
    p.add_argument("--fragment", type=int, default=0, help="send messages in frames of at most N bytes")
    p.add_argument("--bomb", type=int, default=0, help="send one compressible message of N bytes, report the close")
    args = p.parse_args()
    code = asyncio.run(amain(args))
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
