#!/usr/bin/env python3
"""Prints control-channel frames produced by RedPepper's own definitions, as JSON {name: hex}.

Usage: redpepper_reference.py PATH/TO/redpepper/common/messages.py
The frames are built exactly as redpepper-common 0.3.4's connection.py sends them:
msgpack.packb(message.model_dump()) behind a 4-byte big-endian length.
The message list must match CASES in control_frames.rs.
"""
import importlib.util
import json
import sys

import msgpack

spec = importlib.util.spec_from_file_location("redpepper_messages", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)

CASES = {
    "agent_hello": m.AgentHello(id="0b6c1f3e-uid", version="0.1.0", credentials="eyJhbGciOi.token"),
    "manager_hello": m.ManagerHello(version="0.1.0"),
    "ping": m.Ping(data=123456),
    "ping_small": m.Ping(data=7),
    "pong": m.Pong(data=123456),
    "bye": m.Bye(reason="authentication failed"),
    "request": m.Request(id="r1", method="reload", args=["now"], kwargs={"generation": 3}),
    "response_ok": m.Response(id="r1", success=True, data={"generation": 3}),
    "response_err": m.Response(id="r2", success=False, data="spec.batching.maxBatchSize: must be >= 1"),
    "notification": m.Notification(type="heartbeat", data={"agent_id": "x", "queue_depth": 0, "cpu_usage": 1.5}),
}

out = {}
for name, message in CASES.items():
    body = msgpack.packb(message.model_dump())
    out[name] = (len(body).to_bytes(4, "big") + body).hex()
print(json.dumps(out))
