#!/usr/bin/env node
// Minimal nanogate app-socket client: Node.js standard library only (node:net).
//
// Copy send, publish and check into your app. Run this file to see all of them work:
//
//   TENDRL_SOCKET_PATH=/var/lib/tendrl/tendrl_agent.sock node nanogate-client.js
//
// The protocol (docs/architecture.md "App socket", sidecar/README.md): write one JSON message; replies have no
// delimiter, so this client uses one connection per request, half-closes its side after
// writing and reads the reply until the agent closes. An empty reply means "accepted".
'use strict';
const net = require('node:net');

const SOCKET_PATH = process.env.TENDRL_SOCKET_PATH || process.env.TENDRL_SOCKET
  || '/var/lib/tendrl/tendrl_agent.sock';

class NanogateError extends Error {}

/** Sends one message; resolves to the agent's reply (parsed JSON), or null when it sent none. */
function send(message, timeoutMs = 30000) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const socket = net.createConnection({ path: SOCKET_PATH });
    socket.setTimeout(timeoutMs, () => socket.destroy(new Error('timed out')));
    // end() writes the message and half-closes: "that was all"; the agent answers, then closes.
    socket.on('connect', () => socket.end(JSON.stringify(message)));
    socket.on('data', (chunk) => chunks.push(chunk));
    socket.on('error', (e) =>
      reject(new NanogateError(`cannot talk to nano-agent at ${SOCKET_PATH}: ${e.message}`)));
    socket.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      if (text === '') return resolve(null);
      let reply;
      try {
        reply = JSON.parse(text);
      } catch (e) {
        return reject(new NanogateError(`unreadable reply ${text}: ${e.message}`));
      }
      if (reply && reply.status === 'error') return reject(new NanogateError(reply.message));
      resolve(reply);
    });
  });
}

/** Publishes data (an object or a string). wait=false: resolves once the agent queued it.
 *  wait=true: sent at once; resolves to the platform's reply. */
function publish(data, { tags = [], wait = false } = {}) {
  const msg = { msg_type: 'publish', data };
  if (tags.length > 0 || wait) msg.context = { tags, wait };
  return send(msg);
}

/** Messages waiting for this app on the platform (at most limit, max 100); [] if none. */
async function check(limit = 1) {
  const reply = await send({ msg_type: 'msg_check', context: { limit } });
  return reply === 204 ? [] : reply;
}

async function main() {
  const lang = 'node';
  try {
    await publish({ example: lang, step: 'publish' }, { tags: ['example', lang] });
    console.log('publish: accepted');
    const reply = await publish({ example: lang, step: 'wait' }, { tags: ['example'], wait: true });
    console.log('publish with wait:', JSON.stringify(reply));
    console.log('msg_check:', JSON.stringify(await check(5)));
  } catch (e) {
    console.error(`nanogate: ${e.message}`);
    return 1;
  }
  try {
    const tags = Array.from({ length: 11 }, (_, i) => `t${i}`);
    await publish({ example: lang, step: 'rejected' }, { tags });
    console.log('error: none (expected one)');
    return 1;
  } catch (e) {
    if (!(e instanceof NanogateError)) throw e;
    console.log('error:', e.message);
  }
  return 0;
}

module.exports = { send, publish, check, NanogateError };

if (require.main === module) {
  main().then((code) => { process.exitCode = code; });
}
