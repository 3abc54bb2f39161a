#!/usr/bin/env python3
"""Minimal nanogate app-socket client: Python standard library only.

Copy `send`, `publish` and `check` into your app. Run this file to see all of them work:

    TENDRL_SOCKET_PATH=/var/lib/tendrl/tendrl_agent.sock python3 nanogate_client.py

The protocol (docs/architecture.md "App socket", sidecar/README.md): write one JSON message; replies have no
delimiter, so this client uses one connection per request, half-closes its side after writing
and reads the reply until the agent closes. An empty reply means "accepted".
"""
import json
import os
import socket
import sys

SOCKET_PATH = (
    os.environ.get("TENDRL_SOCKET_PATH")
    or os.environ.get("TENDRL_SOCKET")
    or "/var/lib/tendrl/tendrl_agent.sock"
)


class NanogateError(Exception):
    """The agent answered {"status":"error","message":...} or could not be reached."""


def send(message, timeout=30.0):
    """Sends one message; returns the agent's reply (parsed JSON), or None when it sent none."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(SOCKET_PATH)
            s.sendall(json.dumps(message).encode())
            s.shutdown(socket.SHUT_WR)  # "that was all": the agent answers, then closes
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
    except OSError as e:
        raise NanogateError(f"cannot talk to nano-agent at {SOCKET_PATH}: {e}") from e
    if not reply:
        return None
    value = json.loads(reply)
    if isinstance(value, dict) and value.get("status") == "error":
        raise NanogateError(value.get("message", "unknown error"))
    return value


def publish(data, tags=(), wait=False):
    """Publishes `data` (a dict or a string). wait=False: returns once the agent queued it
    (None). wait=True: sent at once; returns the platform's reply."""
    msg = {"msg_type": "publish", "data": data}
    if tags or wait:
        msg["context"] = {"tags": list(tags), "wait": wait}
    return send(msg)


def check(limit=1):
    """Messages waiting for this app on the platform (at most `limit`, max 100); [] if none."""
    reply = send({"msg_type": "msg_check", "context": {"limit": limit}})
    return [] if reply == 204 else reply


def main():
    lang = "python"
    try:
        publish({"example": lang, "step": "publish"}, tags=["example", lang])
        print("publish: accepted")
        reply = publish({"example": lang, "step": "wait"}, tags=["example"], wait=True)
        print("publish with wait:", json.dumps(reply))
        print("msg_check:", json.dumps(check(limit=5)))
    except NanogateError as e:
        print(f"nanogate: {e}", file=sys.stderr)
        return 1
    try:
        publish({"example": lang, "step": "rejected"}, tags=[f"t{i}" for i in range(11)])
        print("error: none (expected one)")
        return 1
    except NanogateError as e:
        print("error:", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
