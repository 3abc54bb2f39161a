//! The connection: opens the WebSocket (TCP, TLS with the client certificate), joins the
//! namespace, runs one session (heartbeats, acknowledgements, the platform's packets) and
//! reconnects with backoff when it ends.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use super::{
    Conn, HEARTBEAT_EVENT, Inner, OUTBOX, RECONNECT_INITIAL, RECONNECT_MAX, RESPONSE_EVENT,
    STABLE_CONNECTION, STATE_CONNECTED, STATE_CONNECTING, STATE_DISCONNECTED, packet,
};
use crate::backoff::Backoff;
use crate::shutdown::Shutdown;

/// Keeps one connection up until `stop` fires: connect, serve, back off, reconnect.
pub(super) async fn supervise(inner: Arc<Inner>, stop: Shutdown) {
    let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
    let mut generation = 0u64;
    loop {
        if stop.is_triggered() {
            break;
        }
        generation += 1;
        inner.set_state(STATE_CONNECTING, None);
        let mut connected_at = None;
        let key_generation = inner.opts.api_key.generation();
        let result = session(&inner, generation, &stop, &mut connected_at).await;
        // Drop the writer first so no new emit picks it up, then fail the emits still
        // waiting for an acknowledgement on this connection (they are retried).
        inner.conn.send_replace(None);
        inner
            .acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, (g, _)| *g != generation);
        let reason = match result {
            Ok(()) => {
                inner.set_state(STATE_DISCONNECTED, None);
                break;
            }
            Err(e) => e,
        };
        inner.set_state(STATE_DISCONNECTED, Some(&format!("socketio: {reason}")));
        if connected_at.is_some_and(|t: Instant| t.elapsed() >= STABLE_CONNECTION) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        inner.metrics.upstream_reconnects.inc();
        tracing::warn!(%reason, url = %inner.opts.url, delay_ms = delay.as_millis() as u64,
            "Socket.IO connection lost or refused; reconnecting");
        // A refusal may be a rotated key: look at the key file now, and reconnect as soon as
        // a new key is there rather than at the end of the backoff.
        inner.opts.api_key.recheck_soon();
        tokio::select! {
            _ = sleep(delay) => {}
            _ = inner.opts.api_key.changed(key_generation) => {}
            _ = stop.triggered() => {}
        }
    }
    inner.conn.send_replace(None);
}

/// A byte stream a WebSocket can run over (TCP, or TLS over TCP).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

async fn open(inner: &Inner, key: &str) -> Result<Ws, String> {
    let ep = &inner.ep;
    let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| format!("connect {}:{}: {e}", ep.host, ep.port))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = if ep.tls {
        let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
            .map_err(|e| format!("{}: not a valid TLS server name: {e}", ep.host))?;
        let tls = tokio_rustls::TlsConnector::from(inner.opts.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {}:{}: {e}", ep.host, ep.port))?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let mut req = ep
        .request_url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("WebSocket request: {e}"))?;
    if !key.is_empty() {
        let v = format!("Bearer {key}")
            .parse()
            .map_err(|_| "the API key is not a valid header value".to_string())?;
        req.headers_mut().insert("authorization", v);
    }
    let (ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| format!("WebSocket upgrade: {e}"))?;
    Ok(ws)
}

/// Next text frame, answering nothing: for the handshake phase.
async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            None => return Err("connection closed during the handshake".into()),
            Some(Err(e)) => return Err(format!("WebSocket: {e}")),
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(_))) => return Err("server closed the WebSocket".into()),
            Some(Ok(_)) => {}
        }
    }
}

/// One connection: Engine.IO open, namespace CONNECT, then serve until it ends. `Ok` only
/// when `stop` ended it.
async fn session(
    inner: &Arc<Inner>,
    generation: u64,
    stop: &Shutdown,
    connected_at: &mut Option<Instant>,
) -> Result<(), String> {
    // The key of this connection: a new one ends it (below), the next connects with it.
    let key = inner.opts.api_key.current();
    let handshake = async {
        let mut ws = open(inner, &key.secret).await?;
        // Engine.IO OPEN: {"sid","upgrades","pingInterval","pingTimeout","maxPayload"}.
        let text = next_text(&mut ws).await?;
        let Some(packet::Engine::Open(json)) = packet::engine(&text) else {
            return Err(format!(
                "expected the Engine.IO open packet, got {text:.40}"
            ));
        };
        let open: Value =
            serde_json::from_str(json).map_err(|e| format!("Engine.IO open packet: {e}"))?;
        let ms = |k: &str, d: u64| {
            Duration::from_millis(open.get(k).and_then(Value::as_u64).unwrap_or(d))
        };
        let liveness = ms("pingInterval", 25_000) + ms("pingTimeout", 20_000);
        if let Some(max) = open.get("maxPayload").and_then(Value::as_u64) {
            inner.max_payload.store(max, Ordering::Relaxed);
        }
        let mut auth = Map::new();
        auth.insert("agent_id".into(), inner.opts.agent_id.clone().into());
        if !key.secret.is_empty() {
            auth.insert("token".into(), key.secret.to_string().into());
        }
        let auth = Value::Object(auth);
        ws.send(Message::text(packet::connect(
            &inner.ep.nsp_prefix,
            Some(&auth),
        )))
        .await
        .map_err(|e| format!("WebSocket: {e}"))?;
        loop {
            let text = next_text(&mut ws).await?;
            match packet::engine(&text) {
                Some(packet::Engine::Ping(d)) => ws
                    .send(Message::text(format!("3{d}")))
                    .await
                    .map_err(|e| format!("WebSocket: {e}"))?,
                Some(packet::Engine::Message(m)) => {
                    let p = packet::socket(m)?;
                    match p.kind {
                        packet::Kind::Connect => return Ok((ws, liveness)),
                        packet::Kind::ConnectError => {
                            return Err(format!(
                                "namespace {} refused the connection: {}",
                                inner.opts.namespace,
                                p.data.map_or_else(String::new, |d| d
                                    .get("message")
                                    .and_then(Value::as_str)
                                    .map_or_else(|| d.to_string(), str::to_owned))
                            ));
                        }
                        _ => {}
                    }
                }
                Some(packet::Engine::Close) => return Err("server closed the session".into()),
                _ => {}
            }
        }
    };
    let (mut ws, liveness) = tokio::select! {
        r = timeout(inner.opts.connect_timeout, handshake) => match r {
            Ok(r) => r?,
            Err(_) => return Err(format!("no Socket.IO handshake within {:?}", inner.opts.connect_timeout)),
        },
        _ = stop.triggered() => return Ok(()),
    };

    let (tx, mut outbox) = mpsc::channel::<String>(OUTBOX);
    inner.conn.send_replace(Some(Conn {
        tx: tx.clone(),
        generation,
    }));
    *connected_at = Some(Instant::now());
    inner.set_state(STATE_CONNECTED, None);
    tracing::info!(url = %inner.opts.url, namespace = %inner.opts.namespace, "Socket.IO connected");

    // The first heartbeat goes out right away (the cloud protocol starts the emitter on `connect`).
    let mut heartbeat = tokio::time::interval(inner.opts.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let ws_err = |e: tokio_tungstenite::tungstenite::Error| format!("WebSocket: {e}");
    loop {
        tokio::select! {
            _ = stop.triggered() => {
                let _ = ws.send(Message::text(format!("41{}", inner.ep.nsp_prefix))).await;
                let _ = ws.close(None).await;
                return Ok(());
            }
            _ = inner.opts.api_key.changed(key.generation) => {
                let _ = ws.send(Message::text(format!("41{}", inner.ep.nsp_prefix))).await;
                let _ = ws.close(None).await;
                return Err("the API key was rotated; reconnecting with the new key".into());
            }
            frame = outbox.recv() => {
                let Some(frame) = frame else { return Err("writer closed".into()) };
                ws.feed(Message::text(frame)).await.map_err(ws_err)?;
                // Coalesce what is already queued into one flush.
                let mut n = 0;
                while n < 256 {
                    let Ok(more) = outbox.try_recv() else { break };
                    ws.feed(Message::text(more)).await.map_err(ws_err)?;
                    n += 1;
                }
                ws.flush().await.map_err(ws_err)?;
            }
            _ = heartbeat.tick() => {
                let hb = inner.heartbeat().to_string();
                ws.send(Message::text(packet::event(&inner.ep.nsp_prefix, None, HEARTBEAT_EVENT, &hb)))
                    .await
                    .map_err(ws_err)?;
                tracing::debug!("heartbeat sent");
            }
            _ = sleep_until(last_heard + liveness) => {
                return Err(format!("nothing heard from the server for {liveness:?} (Engine.IO ping timeout)"));
            }
            msg = ws.next() => {
                let text = match msg {
                    None => return Err("server closed the connection".into()),
                    Some(Err(e)) => return Err(ws_err(e)),
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) => return Err("server closed the WebSocket".into()),
                    Some(Ok(_)) => continue,
                };
                last_heard = Instant::now();
                match packet::engine(text.as_str()) {
                    Some(packet::Engine::Ping(d)) => {
                        ws.send(Message::text(format!("3{d}"))).await.map_err(ws_err)?;
                    }
                    Some(packet::Engine::Close) => return Err("server closed the session".into()),
                    Some(packet::Engine::Message(m)) => on_packet(inner, m, &tx)?,
                    _ => {}
                }
            }
        }
    }
}

/// Handles a Socket.IO packet of the live connection.
fn on_packet(inner: &Arc<Inner>, text: &str, tx: &mpsc::Sender<String>) -> Result<(), String> {
    let p = match packet::socket(text) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an undecodable Socket.IO packet");
            return Ok(());
        }
    };
    if p.nsp != inner.opts.namespace && !(p.nsp == "/" && inner.ep.nsp_prefix.is_empty()) {
        return Ok(());
    }
    match p.kind {
        packet::Kind::Ack => {
            if let Some(id) = p.id {
                let waiter = inner
                    .acks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                if let Some((_, w)) = waiter {
                    let _ = w.send(p.data.unwrap_or(Value::Array(vec![])));
                }
            }
        }
        packet::Kind::Event => {
            let mut args = match p.data {
                Some(Value::Array(a)) => a.into_iter(),
                _ => return Ok(()),
            };
            let Some(Value::String(action)) = args.next() else {
                return Ok(());
            };
            let request = args.next().unwrap_or(Value::Null);
            let inner = inner.clone();
            let tx = tx.clone();
            // Commands run on their own task: a `flush` waits for deliveries whose
            // acknowledgements this connection's loop must keep reading.
            tokio::spawn(async move {
                let reply = inner.command(&action, request).await;
                let frame = match p.id {
                    Some(id) => packet::ack(&inner.ep.nsp_prefix, id, &reply),
                    None => packet::event(
                        &inner.ep.nsp_prefix,
                        None,
                        RESPONSE_EVENT,
                        &reply.to_string(),
                    ),
                };
                let _ = tx.send(frame).await;
            });
        }
        packet::Kind::Disconnect => return Err("server disconnected the namespace".into()),
        packet::Kind::ConnectError => {
            return Err(format!(
                "server error: {}",
                p.data.map(|d| d.to_string()).unwrap_or_default()
            ));
        }
        packet::Kind::BinaryEvent | packet::Kind::BinaryAck => {
            tracing::warn!("ignoring a binary Socket.IO packet (the agent speaks JSON only)");
        }
        packet::Kind::Connect => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_is_one_to_thirty_seconds() {
        let mut b = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
        let caps: Vec<u64> = (0..8)
            .map(|_| {
                let cap = b.cap();
                assert!(b.next_delay() <= cap);
                cap.as_secs()
            })
            .collect();
        assert_eq!(caps, [1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
