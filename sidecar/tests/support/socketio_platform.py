#!/usr/bin/env python3
"""A real Socket.IO platform (python-socketio + aiohttp) for nano-agent's `socketio` tests.

Serves Socket.IO v5 over TLS on 127.0.0.1:PORT and requires a client certificate signed by
--ca (mTLS). Everything it sees is printed to stdout as one JSON object per line, with a
monotonic timestamp `t`:

  {"event":"listening","port":P}
  {"event":"connect","sid":…,"auth":{…},"client_cn":"…"}      client_cn from the peer cert
  {"event":"disconnect","sid":…}
  {"event":"heartbeat","data":{…}}
  {"event":"messages","count":N,"ids":[data.id of each message]}
  {"event":"message","data":{…}}                              a wait:true publish
  {"event":"reply","tag":T,"reply":…} / {"event":"reply","tag":T,"error":"…"}

Commands come on stdin, one JSON object per line:

  {"op":"call","tag":T,"event":"flush","data":{…}}   emit to the agent with an ack, print the reply
  {"op":"ack_mode","mode":"ok"|"none"|"error"}       how `messages` is acknowledged
                                                     (none = never: the agent must retry)
"""

import argparse
import asyncio
import json
import ssl
import sys
import threading
import time

import socketio
from aiohttp import web


def out(obj):
    obj["t"] = time.monotonic()
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def client_cn(environ):
    try:
        cert = environ["aiohttp.request"].transport.get_extra_info("peercert") or {}
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return value
    except Exception:  # noqa: BLE001 - diagnostics only
        pass
    return None


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--namespace", default="/")
    p.add_argument("--ping-interval", type=float, default=25)
    p.add_argument("--ping-timeout", type=float, default=20)
    p.add_argument("--max-payload", type=int, default=1_000_000,
                   help="largest packet accepted (announced as maxPayload; bigger ones close the connection)")
    p.add_argument("--quiet", action="store_true", help="do not print per-batch events")
    args = p.parse_args()
    ns = args.namespace

    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        max_http_buffer_size=args.max_payload,
        logger=False,
        engineio_logger=False,
    )
    app = web.Application()
    sio.attach(app)
    state = {"sid": None, "ack_mode": "ok", "received": 0}

    @sio.on("connect", namespace=ns)
    async def connect(sid, environ, auth=None):
        state["sid"] = sid
        out({"event": "connect", "sid": sid, "auth": auth, "client_cn": client_cn(environ)})

    @sio.on("disconnect", namespace=ns)
    async def disconnect(sid, *reason):
        if state["sid"] == sid:
            state["sid"] = None
        out({"event": "disconnect", "sid": sid})

    @sio.on("heartbeat", namespace=ns)
    async def heartbeat(sid, data):
        out({"event": "heartbeat", "data": data})

    @sio.on("messages", namespace=ns)
    async def messages(sid, data):
        mode = state["ack_mode"]
        if mode == "none":
            await asyncio.sleep(3600)
        state["received"] += len(data)
        if not args.quiet:
            ids = [m.get("data", {}).get("id") if isinstance(m.get("data"), dict) else None for m in data]
            out({"event": "messages", "count": len(data), "ids": ids})
        if mode == "error":
            return {"status": "error", "error": "refused by the test platform"}
        return {"status": "ok", "received": len(data)}

    @sio.on("message", namespace=ns)
    async def message(sid, data):
        out({"event": "message", "data": data})
        return {"status": "ok", "received": 1}

    async def handle(cmd):
        op = cmd.get("op")
        if op == "ack_mode":
            state["ack_mode"] = cmd["mode"]
            out({"event": "ack_mode", "mode": cmd["mode"]})
        elif op == "count":
            out({"event": "count", "tag": cmd.get("tag"), "received": state["received"]})
        elif op == "call":
            tag = cmd.get("tag")
            try:
                if state["sid"] is None:
                    raise RuntimeError("no agent connected")
                reply = await sio.call(cmd["event"], cmd.get("data"), to=state["sid"],
                                       namespace=ns, timeout=cmd.get("timeout", 10))
                out({"event": "reply", "tag": tag, "reply": reply})
            except Exception as e:  # noqa: BLE001 - reported to the test
                out({"event": "reply", "tag": tag, "error": f"{type(e).__name__}: {e}"})

    loop = asyncio.get_running_loop()

    def read_stdin():
        for line in sys.stdin:
            line = line.strip()
            if line:
                asyncio.run_coroutine_threadsafe(handle(json.loads(line)), loop)
        # The test process went away: stop too.
        loop.call_soon_threadsafe(stop.set)

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, ssl_context=ctx, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    threading.Thread(target=read_stdin, daemon=True).start()
    out({"event": "listening", "port": args.port})
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
