#!/usr/bin/env python3
"""Writes the golden vectors of this directory from an implementation of PROTOCOL.md
that is independent of the Rust codec. `proto/tests/vectors.rs` checks the Rust codec
against the files; run this only on a deliberate wire change and review the diff.

    python3 proto/vectors/generate.py
"""
import base64
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

TAG = {"auth": 0x01, "auth_response": 0x02, "connect": 0x03, "connect_response": 0x04,
       "data": 0x05, "close": 0x06, "ping": 0x07, "pong": 0x08, "error": 0x09,
       "window_update": 0x0A, "fin": 0x0B, "forward": 0x0C, "forward_response": 0x0D}
CODE = {"AUTH_FAILED": 1, "INVALID_MESSAGE": 2, "CONNECTION_FAILED": 3,
        "FORBIDDEN_HOST": 4, "RATE_LIMITED": 5, "INTERNAL_ERROR": 6}
PROTO = {"tcp": 0, "udp": 1}

# name -> (type, fields). Payloads are bytes; connection ids are ints (None = absent).
VECTORS = {
    "auth": ("auth", dict(username="agent-1", password="s3cret!", client_id="client-é01")),
    "auth_response_ok": ("auth_response", dict(success=True, message="Authentication successful")),
    "auth_response_fail": ("auth_response", dict(success=False, message="invalid credentials")),
    "connect_tcp": ("connect", dict(id=1, host="example.com", port=443, protocol="tcp")),
    "connect_udp": ("connect", dict(id=4294967295, host="2001:db8::53", port=53, protocol="udp")),
    "connect_response_ok": ("connect_response", dict(id=1, success=True, message="connected")),
    "connect_response_fail": ("connect_response",
                              dict(id=2, success=False, message="refused: connection refused")),
    "data": ("data", dict(id=1, payload=b"\x00\x01\xff\xfe\x80GET /\r\n")),
    "data_empty": ("data", dict(id=3, payload=b"")),
    "close": ("close", dict(id=1, reason='peer said "bye"\n')),
    "ping": ("ping", dict(timestamp=1640995200)),
    "pong": ("pong", dict(timestamp=1640995200)),
    "ping_negative": ("ping", dict(timestamp=-2)),
    "error_auth_failed": ("error", dict(code="AUTH_FAILED", message="invalid credentials", id=None)),
    "error_invalid_message": ("error", dict(code="INVALID_MESSAGE",
                                            message="unknown message type \"hello\"", id=None)),
    "error_connection_failed": ("error", dict(code="CONNECTION_FAILED",
                                              message="timeout: no answer in 10s", id=7)),
    "error_forbidden_host": ("error", dict(code="FORBIDDEN_HOST",
                                           message="10.0.0.1:22 is forbidden", id=8)),
    "error_rate_limited": ("error", dict(code="RATE_LIMITED", message="too many connections", id=0)),
    "error_internal_error": ("error", dict(code="INTERNAL_ERROR", message="internal error", id=None)),
    "window_update": ("window_update", dict(id=5, increment=262144)),
    "window_update_max": ("window_update", dict(id=4294967295, increment=4294967295)),
    "fin": ("fin", dict(id=5)),
    "forward": ("forward", dict(listen_port=20022, host="db.internal", port=5432)),
    "forward_udp": ("forward", dict(listen_port=20053, host="10.0.0.53", port=53,
                                    protocol="udp")),
    "forward_response_fail": ("forward_response",
                              dict(listen_port=20022, success=False,
                                   message="port 20022 is already forwarded by agent \"a1\"")),
    "forward_response_udp_ok": ("forward_response",
                                dict(listen_port=20053, success=True,
                                     message="listening on 127.0.0.1:20053/udp",
                                     protocol="udp")),
}


def json_body(kind, f):
    cid = lambda: str(f["id"])
    if kind == "auth":
        return {"username": f["username"], "password": f["password"], "client_id": f["client_id"]}
    if kind in ("auth_response",):
        return {"success": f["success"], "message": f["message"]}
    if kind == "connect":
        return {"connection_id": cid(), "target_host": f["host"], "target_port": f["port"],
                "protocol": f["protocol"]}
    if kind == "connect_response":
        return {"connection_id": cid(), "success": f["success"], "message": f["message"]}
    if kind == "data":
        return {"connection_id": cid(), "payload": base64.b64encode(f["payload"]).decode()}
    if kind == "close":
        return {"connection_id": cid(), "reason": f["reason"]}
    if kind in ("ping", "pong"):
        return {"timestamp": f["timestamp"]}
    if kind == "error":
        body = {"code": f["code"], "message": f["message"]}
        if f["id"] is not None:
            body["connection_id"] = cid()
        return body
    if kind == "window_update":
        return {"connection_id": cid(), "increment": f["increment"]}
    if kind == "fin":
        return {"connection_id": cid()}
    if kind == "forward":
        body = {"listen_port": f["listen_port"], "target_host": f["host"], "target_port": f["port"]}
        return with_forward_protocol(body, f)
    if kind == "forward_response":
        body = {"listen_port": f["listen_port"], "success": f["success"], "message": f["message"]}
        return with_forward_protocol(body, f)
    raise ValueError(kind)


def with_forward_protocol(body, f):
    """A forward's protocol is written only when it is udp (absent means tcp)."""
    if f.get("protocol", "tcp") != "tcp":
        body["protocol"] = f["protocol"]
    return body


def forward_trailer(f):
    """The binary form of the same rule: one protocol byte at the end, udp only."""
    p = f.get("protocol", "tcp")
    return [] if p == "tcp" else ["%02x" % PROTO[p]]


def encode_json(kind, f):
    return json.dumps({"type": kind, "data": json_body(kind, f)},
                      separators=(",", ":"), ensure_ascii=False).encode()


def s(text):
    raw = text.encode()
    assert len(raw) <= 4096
    return struct.pack(">H", len(raw)).hex() + " " + raw.hex()


def binary_fields(kind, f):
    """(connection id of the header, [hex of each body field])"""
    if kind == "auth":
        return 0, [s(f["username"]), s(f["password"]), s(f["client_id"])]
    if kind in ("auth_response", "connect_response"):
        return f.get("id", 0), ["%02x" % int(f["success"]), s(f["message"])]
    if kind == "connect":
        return f["id"], ["%02x" % PROTO[f["protocol"]], struct.pack(">H", f["port"]).hex(),
                         s(f["host"])]
    if kind == "data":
        p = f["payload"].hex()
        return f["id"], [p[i:i + 64] for i in range(0, len(p), 64)]
    if kind == "close":
        return f["id"], [s(f["reason"])]
    if kind in ("ping", "pong"):
        return 0, [struct.pack(">q", f["timestamp"]).hex()]
    if kind == "error":
        has_id = f["id"] is not None
        return (f["id"] if has_id else 0), ["%02x" % CODE[f["code"]], "%02x" % int(has_id),
                                            s(f["message"])]
    if kind == "window_update":
        return f["id"], [struct.pack(">I", f["increment"]).hex()]
    if kind == "fin":
        return f["id"], []
    if kind == "forward":
        return 0, [struct.pack(">H", f["listen_port"]).hex(), struct.pack(">H", f["port"]).hex(),
                   s(f["host"])] + forward_trailer(f)
    if kind == "forward_response":
        return 0, [struct.pack(">H", f["listen_port"]).hex(), "%02x" % int(f["success"]),
                   s(f["message"])] + forward_trailer(f)
    raise ValueError(kind)


def encode_binary_hex(kind, f):
    """One line for the 9-byte header (tag, id, body length), one line per body field."""
    cid, fields = binary_fields(kind, f)
    body_len = sum(len(x.replace(" ", "")) // 2 for x in fields)
    header = "%02x %08x %08x" % (TAG[kind], cid, body_len)
    return "\n".join([header] + [x for x in fields if x]) + "\n"


# Forms a peer written from the API document alone may send, which anyproxy accepts
# (PROTOCOL.md section 3.1). name -> (input text exactly as the peer sends it, the body
# anyproxy's encoder writes for the decoded message with the same connection-id map).
# A number written as {"raw": "..."} is JSON number text that must come back verbatim.
UUID = "3f2b8c1e-9d4a-4b7e-8c21-5a6f0e9d1b2c"
ACCEPTED = {
    "auth_response_no_message": (
        '{"type":"auth_response","data":{"success":true}}',
        ("auth_response", {"success": True, "message": ""})),
    "connect_response_no_message": (
        '{"type":"connect_response","data":{"connection_id":"1","success":true}}',
        ("connect_response", {"connection_id": "1", "success": True, "message": ""})),
    "close_no_reason": (
        '{"type":"close","data":{"connection_id":"9","reason":null}}',
        ("close", {"connection_id": "9", "reason": ""})),
    "error_no_message": (
        '{"type":"error","data":{"code":"CONNECTION_FAILED","connection_id":7}}',
        ("error", {"code": "CONNECTION_FAILED", "message": "", "connection_id": "7"})),
    "ping_float": (
        '{"type":"ping","data":{"timestamp":1640995200.5}}',
        ("ping", {"timestamp": {"raw": "1640995200.5"}})),
    "ping_exponent": (
        '{"type": "ping", "data": {"timestamp": 1.6409952E+9}}',
        ("ping", {"timestamp": {"raw": "1.6409952E+9"}})),
    "pong_negative_zero": (
        '{"type":"pong","data":{"timestamp":-0}}',
        ("pong", {"timestamp": {"raw": "-0"}})),
    "connect_string_id": (
        '{\n  "data": {\n    "protocol": "tcp",\n    "target_port": 80,\n'
        '    "target_host": "target.example.com",\n    "connection_id": "' + UUID + '",\n'
        '    "priority": 3\n  },\n  "type": "connect",\n  "version": 1\n}\n',
        ("connect", {"connection_id": UUID, "target_host": "target.example.com",
                     "target_port": 80, "protocol": "tcp"})),
    "data_string_id": (
        '{"type":"data","data":{"connection_id":"' + UUID + '","payload":"aGVsbG8="}}',
        ("data", {"connection_id": UUID, "payload": "aGVsbG8="})),
    "data_escaped_string_id": (
        '{"type":"data","data":{"payload":"aGVsbG8=","connection_id":"conn\\u002f\\"7\\""}}',
        ("data", {"connection_id": 'conn/"7"', "payload": "aGVsbG8="})),
    "close_string_id_extra_fields": (
        '{"type":"close","id":42,"data":{"connection_id":"' + UUID + '","reason":"done",'
        '"extra":{"nested":[1,2]}}}',
        ("close", {"connection_id": UUID, "reason": "done"})),
}


def encode_accepted_out(kind, body):
    raws = {}
    def sub(v):
        if isinstance(v, dict) and set(v) == {"raw"}:
            key = "@RAW%d@" % len(raws)
            raws[key] = v["raw"]
            return key
        return v
    body = {k: sub(v) for k, v in body.items()}
    text = json.dumps({"type": kind, "data": body}, separators=(",", ":"), ensure_ascii=False)
    for key, raw in raws.items():
        text = text.replace('"%s"' % key, raw)
    return text.encode()


def main():
    for name, (kind, fields) in VECTORS.items():
        with open(os.path.join(HERE, name + ".json"), "wb") as out:
            out.write(encode_json(kind, fields))
        with open(os.path.join(HERE, name + ".bin.hex"), "w") as out:
            out.write(encode_binary_hex(kind, fields))
    os.makedirs(os.path.join(HERE, "accepted"), exist_ok=True)
    for name, (given, (kind, body)) in ACCEPTED.items():
        json.loads(given)  # every input is valid JSON
        with open(os.path.join(HERE, "accepted", name + ".in.json"), "wb") as out:
            out.write(given.encode())
        with open(os.path.join(HERE, "accepted", name + ".out.json"), "wb") as out:
            out.write(encode_accepted_out(kind, body))


if __name__ == "__main__":
    main()
