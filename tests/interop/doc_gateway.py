#!/usr/bin/env python3
"""Independent, strictly validating JSON-mode gateway written from the AnyProxy API document.

It serves the document's WebSocket protocol (wss://127.0.0.1:PORT/ws, JSON text
frames ``{"type": ..., "data": {...}}``), authenticates one or more agents, and
port-forwards plain TCP connections through the most recently authenticated
agent.  Every message received from an agent is validated against the document;
deviations are recorded as violations in a JSON report.

Usage:
  doc_gateway.py --port P --cert CERT.pem --key KEY.pem --username U --password P \
      --forward LISTEN_PORT:TARGET_HOST:TARGET_PORT --report REPORT.json \
      [--ping-interval 0]

stdout: ``READY`` once the WSS listener and all forward listeners are up,
``AGENT_AUTHED <client_id>`` whenever an agent authenticates.
The report is rewritten every second and on SIGTERM/SIGINT (exit code 0):
  {"violations": [...], "received": {"auth": n, ...}, "connections": n,
   "warnings": [...], "info": {...}}
"""

import argparse
import uuid
import asyncio
import base64
import binascii
import json
import os
import signal
import socket
import ssl
import sys
import time

import websockets
from websockets.asyncio.server import serve as ws_serve

ERROR_CODES = {
    "AUTH_FAILED",
    "INVALID_MESSAGE",
    "CONNECTION_FAILED",
    "FORBIDDEN_HOST",
    "RATE_LIMITED",
    "INTERNAL_ERROR",
}

# Required fields (name -> JSON type) of every client -> gateway message type.
# "connection_id" of `error` is optional and handled separately.
SCHEMAS = {
    "auth": {"username": str, "password": str, "client_id": str},
    "connect_response": {"connection_id": str, "success": bool, "message": str},
    "data": {"connection_id": str, "payload": str},
    "close": {"connection_id": str, "reason": str},
    "ping": {"timestamp": int},
    "pong": {"timestamp": int},
    "error": {"code": str, "message": str},
}
OPTIONAL = {"error": {"connection_id": str}}

CHUNK = 32 * 1024
QUEUE_MAX = 512
CONNECT_RESPONSE_TIMEOUT = 30.0
AUTH_TIMEOUT = 30.0
MAX_VIOLATIONS = 1000
MAX_WARNINGS = 1000

_CLOSE_SENTINEL = object()


def log(*args):
    print("[doc_gateway]", *args, file=sys.stderr, flush=True)


def encode(msg_type, data):
    return json.dumps({"type": msg_type, "data": data}, separators=(",", ":"))


def json_type_name(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def type_ok(value, expected):
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is bool:
        return isinstance(value, bool)
    return isinstance(value, expected)


class Report:
    def __init__(self, path):
        self.path = path
        self.violations = []
        self.violation_count = 0
        self.warnings = []
        self.received = {}
        self.connections = 0
        self.info = {
            "agents_authed": 0,
            "auth_failures": 0,
            "connect_ok": 0,
            "connect_failed": 0,
            "bytes_to_agent": 0,
            "bytes_from_agent": 0,
            "subprotocols_offered": [],
            "extensions_offered": [],
            "pings_answered": 0,
        }

    def violation(self, text):
        self.violation_count += 1
        log("VIOLATION:", text)
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(text)

    def warning(self, text):
        log("warning:", text)
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(text)

    def count(self, mtype):
        self.received[mtype] = self.received.get(mtype, 0) + 1

    def write(self):
        doc = {
            "violations": self.violations,
            "received": self.received,
            "connections": self.connections,
            "violation_count": self.violation_count,
            "warnings": self.warnings,
            "info": self.info,
        }
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, self.path)


class Conn:
    def __init__(self, cid, session):
        self.cid = cid
        self.session = session
        self.state = "pending"  # pending -> open | failed ; -> closed
        self.connect_response_seen = False
        self.agent_closed = False  # agent sent `close`
        self.gateway_closed = False  # we sent `close`
        self.response = asyncio.get_running_loop().create_future()
        self.queue = asyncio.Queue(maxsize=QUEUE_MAX)  # agent -> TCP client
        self.reader = None
        self.writer = None


class Session:
    """One authenticated agent WebSocket."""

    def __init__(self, gw, ws):
        self.gw = gw
        self.ws = ws
        self.client_id = None
        self.send_lock = asyncio.Lock()
        self.conns = {}  # every connection id ever opened on this session
        self.alive = True
        self.outstanding_pings = set()

    async def send(self, msg_type, data):
        text = encode(msg_type, data)
        async with self.send_lock:
            await self.ws.send(text)

    async def send_quiet(self, msg_type, data):
        try:
            await self.send(msg_type, data)
            return True
        except websockets.ConnectionClosed:
            return False


class Gateway:
    def __init__(self, args):
        self.args = args
        self.report = Report(args.report)
        self.current = None  # most recently authenticated Session
        self.next_id = 1
        self.ids = args.ids
        self.all_ids = set()  # every connection id issued, across sessions
        self.stop = asyncio.Event()
        self.tasks = set()

    def spawn(self, coro):
        t = asyncio.ensure_future(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t

    # ------------------------------------------------------------ validation
    def parse_and_validate(self, session, raw):
        """Return (mtype, data) if usable, else None.  Records violations."""
        r = self.report
        who = session.client_id or "unauthenticated"
        if isinstance(raw, bytes):
            r.count("<binary>")
            r.violation(f"[{who}] binary frame received (document uses JSON text messages), {len(raw)} bytes")
            return None
        dups = []

        def pairs_hook(pairs):
            obj = {}
            for k, v in pairs:
                if k in obj:
                    dups.append(k)
                obj[k] = v
            return obj

        try:
            msg = json.loads(raw, object_pairs_hook=pairs_hook)
        except ValueError as e:
            r.count("<invalid-json>")
            r.violation(f"[{who}] invalid JSON: {e}: {raw[:200]!r}")
            return None
        if not isinstance(msg, dict):
            r.count("<not-object>")
            r.violation(f"[{who}] top-level JSON is {json_type_name(msg)}, expected object: {raw[:200]!r}")
            return None
        mtype = msg.get("type")
        r.count(mtype if isinstance(mtype, str) else "<bad-type>")
        if dups:
            r.violation(f"[{who}] duplicate JSON object keys {sorted(set(dups))}: {raw[:200]!r}")
        keys = set(msg.keys())
        if keys != {"type", "data"}:
            extra = sorted(keys - {"type", "data"})
            missing = sorted({"type", "data"} - keys)
            r.violation(f"[{who}] top-level keys must be exactly type,data; extra={extra} missing={missing}: {raw[:200]!r}")
            if missing:
                return None
        if not isinstance(mtype, str):
            r.violation(f"[{who}] type is {json_type_name(mtype)}, expected string")
            return None
        if mtype not in SCHEMAS:
            r.violation(f"[{who}] message type {mtype!r} is not a client->gateway type")
            return None
        data = msg["data"]
        if not isinstance(data, dict):
            r.violation(f"[{who}] {mtype}: data is {json_type_name(data)}, expected object")
            return None
        ok = True
        schema = SCHEMAS[mtype]
        optional = OPTIONAL.get(mtype, {})
        for field, expected in schema.items():
            if field not in data:
                r.violation(f"[{who}] {mtype}: missing required field {field!r}")
                ok = False
            elif not type_ok(data[field], expected):
                r.violation(
                    f"[{who}] {mtype}: field {field!r} is {json_type_name(data[field])} "
                    f"({data[field]!r:.60}), expected {json_type_name(expected())}"
                )
                ok = False
        for field, expected in optional.items():
            if field in data and not type_ok(data[field], expected):
                r.violation(
                    f"[{who}] {mtype}: optional field {field!r} is {json_type_name(data[field])}, "
                    f"expected {json_type_name(expected())}"
                )
                ok = False
        extra = sorted(set(data) - set(schema) - set(optional))
        if extra:
            r.warning(f"[{who}] {mtype}: undocumented data fields {extra}")
        if mtype == "error" and isinstance(data.get("code"), str) and data["code"] not in ERROR_CODES:
            r.violation(f"[{who}] error: code {data['code']!r} is not one of the documented codes")
        if mtype == "data" and isinstance(data.get("payload"), str):
            try:
                base64.b64decode(data["payload"], validate=True)
            except (binascii.Error, ValueError) as e:
                r.violation(f"[{who}] data: payload is not valid padded standard base64 ({e}), conn {data.get('connection_id')!r}")
                ok = False
        if not ok:
            return None
        return mtype, data

    # -------------------------------------------------------------- ws side
    async def ws_handler(self, ws):
        req = ws.request
        proto_hdr = req.headers.get_all("Sec-WebSocket-Protocol") if req else []
        ext_hdr = req.headers.get_all("Sec-WebSocket-Extensions") if req else []
        if proto_hdr:
            self.report.info["subprotocols_offered"].append(", ".join(proto_hdr))
        if ext_hdr:
            self.report.info["extensions_offered"].append(", ".join(ext_hdr))
        session = Session(self, ws)
        try:
            if not await self.authenticate(session):
                return
            await self.serve_session(session)
        except websockets.ConnectionClosed:
            pass
        finally:
            session.alive = False
            if self.current is session:
                self.current = None
            for conn in list(session.conns.values()):
                if not conn.response.done():
                    conn.response.set_result(False)
                if conn.state == "open":
                    conn.state = "closed"
                    self.spawn(self._put(conn, _CLOSE_SENTINEL))

    async def authenticate(self, session):
        a = self.args
        try:
            raw = await asyncio.wait_for(session.ws.recv(), AUTH_TIMEOUT)
        except asyncio.TimeoutError:
            self.report.violation("no auth message within %gs of connecting" % AUTH_TIMEOUT)
            await session.ws.close(1008, "auth timeout")
            return False
        parsed = self.parse_and_validate(session, raw)
        if parsed is None or parsed[0] != "auth":
            if parsed is not None:
                self.report.violation(f"first message is {parsed[0]!r}, expected 'auth'")
            await session.send_quiet("error", {"code": "INVALID_MESSAGE", "message": "first message must be a valid auth message"})
            await session.send_quiet("auth_response", {"success": False, "message": "first message must be a valid auth message"})
            await session.ws.close(1008, "authentication required")
            return False
        data = parsed[1]
        if data["username"] != a.username or data["password"] != a.password:
            self.report.info["auth_failures"] += 1
            log("auth failed for client_id", data["client_id"])
            await session.send_quiet("error", {"code": "AUTH_FAILED", "message": "invalid username or password"})
            await session.send_quiet("auth_response", {"success": False, "message": "invalid username or password"})
            await session.ws.close(1008, "authentication failed")
            return False
        session.client_id = data["client_id"]
        await session.send("auth_response", {"success": True, "message": "Authentication successful"})
        self.current = session
        self.report.info["agents_authed"] += 1
        print(f"AGENT_AUTHED {session.client_id}", flush=True)
        return True

    async def serve_session(self, session):
        ping_task = None
        if self.args.ping_interval > 0:
            ping_task = self.spawn(self.ping_loop(session))
        try:
            async for raw in session.ws:
                parsed = self.parse_and_validate(session, raw)
                if parsed is None:
                    continue
                await self.handle(session, *parsed)
        finally:
            if ping_task is not None:
                ping_task.cancel()

    async def ping_loop(self, session):
        seq = 0
        while session.alive:
            await asyncio.sleep(self.args.ping_interval)
            seq += 1
            ts = int(time.time()) * 1000 + seq % 1000  # unique-ish integer timestamp
            session.outstanding_pings.add(ts)
            if not await session.send_quiet("ping", {"timestamp": ts}):
                return

    def lookup(self, session, mtype, cid):
        conn = session.conns.get(cid)
        if conn is None:
            if cid in self.all_ids:
                self.report.violation(f"[{session.client_id}] {mtype}: connection_id {cid!r} belongs to another agent session")
            else:
                self.report.violation(f"[{session.client_id}] {mtype}: connection_id {cid!r} was never opened by this gateway")
        return conn

    async def handle(self, session, mtype, data):
        r = self.report
        who = session.client_id
        if mtype == "auth":
            r.violation(f"[{who}] auth received on an already authenticated session")
        elif mtype == "ping":
            r.info["pings_answered"] += 1
            await session.send_quiet("pong", {"timestamp": data["timestamp"]})
        elif mtype == "pong":
            ts = data["timestamp"]
            if ts in session.outstanding_pings:
                session.outstanding_pings.discard(ts)
            elif self.args.ping_interval > 0:
                r.violation(f"[{who}] pong timestamp {ts} does not match any ping sent")
            else:
                r.warning(f"[{who}] unsolicited pong (timestamp {ts})")
        elif mtype == "error":
            cid = data.get("connection_id")
            log(f"[{who}] agent error: {json.dumps(data)}")
            if cid is not None:
                self.lookup(session, mtype, cid)
        elif mtype == "connect_response":
            conn = self.lookup(session, mtype, data["connection_id"])
            if conn is None:
                return
            if conn.connect_response_seen:
                r.violation(f"[{who}] connect_response: duplicate for connection {conn.cid}")
                return
            conn.connect_response_seen = True
            if conn.agent_closed:
                r.violation(f"[{who}] connect_response: after the agent closed connection {conn.cid}")
            if data["success"] and conn.state == "pending":
                conn.state = "open"
            elif conn.state == "pending":
                conn.state = "failed"
            if not conn.response.done():
                conn.response.set_result(data["success"])
        elif mtype == "data":
            conn = self.lookup(session, mtype, data["connection_id"])
            if conn is None:
                return
            if not conn.connect_response_seen:
                r.violation(f"[{who}] data: for connection {conn.cid} before its connect_response")
                return
            if conn.agent_closed:
                r.violation(f"[{who}] data: for connection {conn.cid} after the agent closed it")
                return
            if conn.gateway_closed:
                return  # in flight when we closed it; drop
            if conn.state == "failed":
                r.violation(f"[{who}] data: for connection {conn.cid} whose connect_response was success=false")
                return
            if conn.state != "open":
                return  # session torn down
            chunk = base64.b64decode(data["payload"], validate=True)
            r.info["bytes_from_agent"] += len(chunk)
            if chunk:
                await self._put(conn, chunk)
        elif mtype == "close":
            conn = self.lookup(session, mtype, data["connection_id"])
            if conn is None:
                return
            conn.agent_closed = True
            if not conn.response.done():
                # close instead of a connect_response: treat as failure
                conn.response.set_result(False)
            if conn.state == "open":
                conn.state = "closed"
                await self._put(conn, _CLOSE_SENTINEL)

    async def _put(self, conn, item):
        await conn.queue.put(item)

    # ------------------------------------------------------------- tcp side
    async def tcp_handler(self, reader, writer, target_host, target_port):
        self.report.connections += 1
        session = self.current
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if session is None or not session.alive:
            log("no authenticated agent; dropping TCP connection")
            writer.close()
            return
        cid = str(uuid.uuid4()) if self.ids == "uuid" else str(self.next_id)
        self.next_id += 1
        self.all_ids.add(cid)
        conn = Conn(cid, session)
        conn.reader, conn.writer = reader, writer
        session.conns[cid] = conn
        ok = await session.send_quiet(
            "connect",
            {"connection_id": cid, "target_host": target_host, "target_port": target_port, "protocol": "tcp"},
        )
        success = False
        if ok:
            try:
                success = await asyncio.wait_for(asyncio.shield(conn.response), CONNECT_RESPONSE_TIMEOUT)
            except asyncio.TimeoutError:
                self.report.violation(f"[{session.client_id}] no connect_response for connection {cid} within {CONNECT_RESPONSE_TIMEOUT:g}s")
                conn.state = "failed"
                conn.gateway_closed = True
                await session.send_quiet("close", {"connection_id": cid, "reason": "connect_response timeout"})
        if not success:
            if conn.state == "pending":
                conn.state = "failed"
            self.report.info["connect_failed"] += 1
            writer.close()
            return
        self.report.info["connect_ok"] += 1
        # The agent may already have sent data and even `close` for this
        # connection (the receive loop runs ahead of us): the writer task
        # flushes everything queued, up to the close sentinel.
        writer_task = self.spawn(self.agent_to_client(conn))
        if conn.state == "open":
            await self.client_to_agent(conn)
        await writer_task

    async def client_to_agent(self, conn):
        session = conn.session
        reason = "client closed connection"
        try:
            while conn.state == "open":
                chunk = await conn.reader.read(CHUNK)
                if not chunk:
                    break
                if conn.state != "open":
                    return
                self.report.info["bytes_to_agent"] += len(chunk)
                await session.send(
                    "data", {"connection_id": conn.cid, "payload": base64.b64encode(chunk).decode("ascii")}
                )
        except websockets.ConnectionClosed:
            return
        except (OSError, ConnectionError) as e:
            reason = f"client read error: {e}"
        if conn.state != "open":
            return
        conn.state = "closed"
        conn.gateway_closed = True
        await session.send_quiet("close", {"connection_id": conn.cid, "reason": reason})
        try:
            conn.queue.put_nowait(_CLOSE_SENTINEL)
        except asyncio.QueueFull:
            pass
        conn.writer.close()

    async def agent_to_client(self, conn):
        try:
            while True:
                item = await conn.queue.get()
                if item is _CLOSE_SENTINEL or conn.writer.is_closing():
                    break
                conn.writer.write(item)
                await conn.writer.drain()
        except (OSError, ConnectionError) as e:
            if conn.state == "open":
                conn.state = "closed"
                conn.gateway_closed = True
                await conn.session.send_quiet(
                    "close", {"connection_id": conn.cid, "reason": f"client write error: {e}"}
                )
        finally:
            try:
                conn.writer.close()
            except Exception:
                pass

    # ----------------------------------------------------------------- main
    async def report_loop(self):
        while True:
            try:
                self.report.write()
            except OSError as e:
                log("cannot write report:", e)
            await asyncio.sleep(1.0)


def parse_forward(spec):
    try:
        listen, rest = spec.split(":", 1)
        host, port = rest.rsplit(":", 1)
        host = host.strip("[]")
        listen_port, target_port = int(listen), int(port)
        if not host or not (0 < listen_port < 65536) or not (0 < target_port < 65536):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --forward {spec!r}, expected LISTEN_PORT:TARGET_HOST:TARGET_PORT")
    return listen_port, host, target_port


async def amain(args):
    loop = asyncio.get_running_loop()
    gw = Gateway(args)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gw.stop.set)

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(args.cert, args.key)

    def process_request(connection, request):
        path = request.path.split("?", 1)[0]
        if path != "/ws":
            return connection.respond(404, "not found\n")
        return None

    ws_server = await ws_serve(
        gw.ws_handler,
        "127.0.0.1",
        args.port,
        ssl=ctx,
        process_request=process_request,
        compression=None,  # plain document JSON mode: no extensions, no subprotocol
        max_size=64 * 1024 * 1024,
        ping_interval=None,  # heartbeat uses the document's ping/pong messages
        close_timeout=5,
    )
    tcp_servers = []
    for listen_port, host, target_port in args.forward:
        srv = await asyncio.start_server(
            lambda r, w, h=host, p=target_port: gw.tcp_handler(r, w, h, p),
            "127.0.0.1",
            listen_port,
        )
        tcp_servers.append(srv)
    report_task = asyncio.ensure_future(gw.report_loop())
    print("READY", flush=True)

    await gw.stop.wait()

    report_task.cancel()
    for srv in tcp_servers:
        srv.close()
    ws_server.close()
    try:
        await asyncio.wait_for(ws_server.wait_closed(), 5)
    except (asyncio.TimeoutError, Exception):
        pass
    for t in list(gw.tasks):
        t.cancel()
    if gw.tasks:
        await asyncio.wait(list(gw.tasks), timeout=5)
    gw.report.write()
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="WSS listen port on 127.0.0.1 (path /ws)")
    p.add_argument("--cert", required=True, help="TLS certificate (PEM)")
    p.add_argument("--key", required=True, help="TLS private key (PEM)")
    p.add_argument("--username", required=True)
    p.add_argument("--password", required=True)
    p.add_argument(
        "--forward",
        type=parse_forward,
        action="append",
        required=True,
        help="LISTEN_PORT:TARGET_HOST:TARGET_PORT (repeatable); listens on 127.0.0.1:LISTEN_PORT",
    )
    p.add_argument("--report", required=True, help="JSON report path (rewritten every second)")
    p.add_argument("--ids", choices=["numeric", "uuid"], default="numeric", help="connection_id style: decimal strings or UUIDs")
    p.add_argument(
        "--ping-interval",
        type=float,
        default=0.0,
        help="also send ping messages to the agent every N seconds and check the pong timestamps (0 = off, the default; the document only has client->gateway pings)",
    )
    args = p.parse_args()
    code = asyncio.run(amain(args))
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
