#!/bin/sh
# The example app of examples/Dockerfile (image ghcr.io/nanogate/example-app): publishes one
# message every $PUBLISH_INTERVAL seconds (default 5) through nano-agent's app socket with the
# shell client next to this file (nanogate.sh: socat or OpenBSD nc), and says on stdout what it
# did, so `kubectl logs POD -c app` shows it:
#
#   publish-loop: published counter=3 (accepted)
#
# The socket is $TENDRL_SOCKET_PATH (set by the injector), else $TENDRL_SOCKET, else
# /var/lib/tendrl/tendrl_agent.sock, as in every example. Each message is
# {"app":"example-app","host":$HOSTNAME,"uid":<the process's uid>,"counter":N} tagged
# example-app; N counts accepted messages, so the platform sees 1, 2, 3, … without gaps. While
# the socket is missing or refuses (the sidecar not started yet, or restarting) the same message
# is retried every interval. SIGTERM or SIGINT (kubectl delete, podman stop) end it with status 0.
set -u
client="$(dirname "$0")/nanogate.sh"
socket="${TENDRL_SOCKET_PATH:-${TENDRL_SOCKET:-/var/lib/tendrl/tendrl_agent.sock}}"
interval=${PUBLISH_INTERVAL:-5}
uid=$(id -u)
host=${HOSTNAME:-$(hostname 2>/dev/null || echo unknown)}
sent=0
sleeper=

stop() {
  [ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null
  echo "publish-loop: $1: $sent messages published, exiting"
  exit 0
}
trap 'stop SIGTERM' TERM
trap 'stop SIGINT' INT

echo "publish-loop: uid $uid gid $(id -g), socket $socket, one message every ${interval}s"
while :; do
  n=$((sent + 1))
  data="{\"app\":\"example-app\",\"host\":\"$host\",\"uid\":$uid,\"counter\":$n}"
  if reply=$(sh "$client" publish "$data" '["example-app"]' 2>&1); then
    sent=$n
    echo "publish-loop: published counter=$n ($reply)"
  else
    echo "publish-loop: counter=$n not published, retrying in ${interval}s: $reply"
  fi
  # In the background, so that a signal ends the wait at once (sh runs traps between commands).
  sleep "$interval" &
  sleeper=$!
  wait "$sleeper"
  sleeper=
done
