#!/bin/sh
# Minimal nanogate app-socket client in POSIX shell, with socat (or OpenBSD netcat: nc -U -N).
#
# Copy nanogate_send / nanogate_publish / nanogate_check into your script. Run this file to see
# all of them work:
#
#   TENDRL_SOCKET_PATH=/var/lib/tendrl/tendrl_agent.sock sh nanogate.sh
#
# or to make one call (e.g. by hand in an app container: `kubectl exec POD -c app -- sh
# /usr/local/bin/nanogate.sh publish '{"by":"hand"}'` in the example app of examples/Dockerfile):
#
#   sh nanogate.sh publish DATA_JSON [TAGS_JSON_ARRAY] [wait]   prints the reply, or "accepted"
#   sh nanogate.sh check [LIMIT]                                prints the waiting messages
#   sh nanogate.sh send JSON                                    prints the reply, if any
#
# The exit status is the helper's: 0, 1 (agent unreachable) or 2 (error reply).
#
# The protocol (docs/architecture.md "App socket", sidecar/README.md): write one JSON message; replies have no
# delimiter, so every call is one connection: write, half-close, read until the agent closes.
# An empty reply means "accepted". Build JSON with a real encoder (jq) when values come from
# outside; this demo only uses constants.
set -u
SOCK="${TENDRL_SOCKET_PATH:-${TENDRL_SOCKET:-/var/lib/tendrl/tendrl_agent.sock}}"

# nanogate_send JSON: prints the agent's reply (nothing when it sent none). Exit status 1 when
# the agent cannot be reached, 2 when it answered {"status":"error",...} (message on stderr).
nanogate_send() {
  if command -v socat >/dev/null 2>&1; then
    # socat half-closes after stdin's EOF and waits up to -t seconds for the reply.
    reply=$(printf '%s' "$1" | socat -t 30 - "UNIX-CONNECT:$SOCK" 2>/dev/null) || reply='<unreachable>'
  else
    reply=$(printf '%s' "$1" | nc -N -U "$SOCK" 2>/dev/null) || reply='<unreachable>'
  fi
  case $reply in
    '<unreachable>')
      echo "cannot talk to nano-agent at $SOCK" >&2
      return 1 ;;
    *'"status":"error"'*)
      printf '%s\n' "$reply" | sed -n 's/.*"message":"\([^"]*\)".*/\1/p' >&2
      return 2 ;;
  esac
  printf '%s' "$reply"
}

# nanogate_publish DATA_JSON [TAGS_JSON_ARRAY] [wait]: with "wait", prints the platform's reply.
nanogate_publish() {
  wait=false; [ "${3:-}" = wait ] && wait=true
  nanogate_send "{\"msg_type\":\"publish\",\"data\":$1,\"context\":{\"tags\":${2:-[]},\"wait\":$wait}}"
}

# nanogate_check [LIMIT]: prints a JSON array of waiting messages ([] when there are none).
nanogate_check() {
  reply=$(nanogate_send "{\"msg_type\":\"msg_check\",\"context\":{\"limit\":${1:-1}}}") || return
  if [ "$reply" = 204 ]; then printf '[]'; else printf '%s' "$reply"; fi
}

main() {
  nanogate_publish '{"example":"shell","step":"publish"}' '["example","shell"]' >/dev/null \
    || exit 1
  echo "publish: accepted"
  reply=$(nanogate_publish '{"example":"shell","step":"wait"}' '["example"]' wait) || exit 1
  echo "publish with wait: $reply"
  messages=$(nanogate_check 5) || exit 1
  echo "msg_check: $messages"

  tags='["t0","t1","t2","t3","t4","t5","t6","t7","t8","t9","t10"]'
  error=$(nanogate_publish '{"example":"shell","step":"rejected"}' "$tags" 2>&1 >/dev/null)
  status=$?
  [ "$status" -eq 2 ] || { echo "nanogate: expected an error reply, got status $status: $error" >&2; exit 1; }
  echo "error: $error"
}

case ${1:-} in
  '') main ;;
  publish)
    shift
    reply=$(nanogate_publish "$@") || exit
    if [ -n "$reply" ]; then printf '%s\n' "$reply"; else echo accepted; fi ;;
  check) shift; nanogate_check "$@" && echo ;;
  send) shift; nanogate_send "$@" && echo ;;
  *)
    echo "usage: sh nanogate.sh [publish DATA [TAGS] [wait] | check [LIMIT] | send JSON]" >&2
    exit 64 ;;
esac
