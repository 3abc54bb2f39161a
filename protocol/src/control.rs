//! Control-channel frames between nano-agent (agent) and the operator hub (manager).
//!
//! The wire format is RedPepper's (`redpepper-common` 0.3.4, `messages.py` + `connection.py`):
//! each frame is a 4-byte big-endian unsigned length followed by a MessagePack map whose key
//! `"t"` holds the integer message type, then the message's fields in their declared order
//! (pydantic's `model_dump()` order, which `msgpack.packb` keeps). Encoding the same message
//! here and there gives the same bytes; `tests/control_frames.rs` pins that with captured
//! reference bytes.
//!
//! The decoder treats its input as hostile: frame lengths above [`MAX_FRAME_LEN`], nesting
//! deeper than [`MAX_DEPTH`], truncated or trailing data, unknown types and missing or mistyped
//! fields are errors, never panics or unbounded allocations.

// Input comes from peers: no panicking accessors outside tests (issue 15).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use rmpv::Value;

/// Largest frame payload either side accepts (the architecture's 1 MiB).
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Deepest MessagePack nesting accepted; heartbeat and reload payloads need a handful of levels.
pub const MAX_DEPTH: usize = 32;

/// One control-channel message. Type codes follow RedPepper.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// 10 — first frame from the agent: its id (pod UID), version and credentials
    /// (its projected service-account token).
    AgentHello {
        id: String,
        version: String,
        credentials: String,
    },
    /// 11 — the manager accepted the agent.
    ManagerHello { version: String },
    /// 12 — keep-alive probe; the peer echoes `data` in a Pong.
    Ping { data: i64 },
    /// 13 — answer to a Ping.
    Pong { data: i64 },
    /// 14 — the sender is closing the connection.
    Bye { reason: String },
    /// 20 — a call: from the hub `reload`, `flush`, `drain`, `status`; from the agent
    /// `left_behind`.
    Request {
        id: String,
        method: String,
        args: Vec<String>,
        kwargs: Vec<(String, Value)>,
    },
    /// 21 — the result of the Request with the same id; `data` is the error text on failure.
    Response {
        id: String,
        success: bool,
        data: Value,
    },
    /// 22 — one-way event (`register`, `heartbeat`; `left_behind` from agents before 0.2).
    Notification { kind: String, data: Value },
}

impl Message {
    /// The RedPepper type code.
    pub fn type_code(&self) -> u8 {
        match self {
            Message::AgentHello { .. } => 10,
            Message::ManagerHello { .. } => 11,
            Message::Ping { .. } => 12,
            Message::Pong { .. } => 13,
            Message::Bye { .. } => 14,
            Message::Request { .. } => 20,
            Message::Response { .. } => 21,
            Message::Notification { .. } => 22,
        }
    }

    /// A short name for logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Message::AgentHello { .. } => "agent_hello",
            Message::ManagerHello { .. } => "manager_hello",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Bye { .. } => "bye",
            Message::Request { .. } => "request",
            Message::Response { .. } => "response",
            Message::Notification { .. } => "notification",
        }
    }

    /// The MessagePack map, fields in RedPepper's order.
    fn to_value(&self) -> Value {
        let s = |v: &str| Value::from(v);
        let mut fields: Vec<(Value, Value)> = vec![(s("t"), Value::from(self.type_code()))];
        match self {
            Message::AgentHello {
                id,
                version,
                credentials,
            } => {
                fields.push((s("id"), s(id)));
                fields.push((s("version"), s(version)));
                fields.push((s("credentials"), s(credentials)));
            }
            Message::ManagerHello { version } => fields.push((s("version"), s(version))),
            Message::Ping { data } | Message::Pong { data } => {
                fields.push((s("data"), Value::from(*data)))
            }
            Message::Bye { reason } => fields.push((s("reason"), s(reason))),
            Message::Request {
                id,
                method,
                args,
                kwargs,
            } => {
                fields.push((s("id"), s(id)));
                fields.push((s("method"), s(method)));
                fields.push((s("args"), Value::Array(args.iter().map(|a| s(a)).collect())));
                let kwargs = kwargs.iter().map(|(k, v)| (s(k), v.clone())).collect();
                fields.push((s("kwargs"), Value::Map(kwargs)));
            }
            Message::Response { id, success, data } => {
                fields.push((s("id"), s(id)));
                fields.push((s("success"), Value::Boolean(*success)));
                fields.push((s("data"), data.clone()));
            }
            Message::Notification { kind, data } => {
                fields.push((s("type"), s(kind)));
                fields.push((s("data"), data.clone()));
            }
        }
        Value::Map(fields)
    }

    fn from_value(value: Value) -> Result<Self, FrameError> {
        let Value::Map(entries) = value else {
            return Err(FrameError::Malformed(
                "frame is not a MessagePack map".into(),
            ));
        };
        let mut fields = Fields(entries);
        let code = fields.int("t")?;
        Ok(match code {
            10 => Message::AgentHello {
                id: fields.string("id")?,
                version: fields.string("version")?,
                credentials: fields.string("credentials")?,
            },
            11 => Message::ManagerHello {
                version: fields.string("version")?,
            },
            12 => Message::Ping {
                data: fields.int("data")?,
            },
            13 => Message::Pong {
                data: fields.int("data")?,
            },
            14 => Message::Bye {
                reason: fields.string("reason")?,
            },
            20 => Message::Request {
                id: fields.string("id")?,
                method: fields.string("method")?,
                args: match fields.take("args")? {
                    Value::Array(items) => items
                        .into_iter()
                        .map(|item| match item {
                            Value::String(s) => s.into_str().ok_or(FrameError::WrongType("args")),
                            _ => Err(FrameError::WrongType("args")),
                        })
                        .collect::<Result<_, _>>()?,
                    _ => return Err(FrameError::WrongType("args")),
                },
                kwargs: match fields.take("kwargs")? {
                    Value::Map(entries) => entries
                        .into_iter()
                        .map(|(k, v)| match k {
                            Value::String(s) => s
                                .into_str()
                                .map(|k| (k, v))
                                .ok_or(FrameError::WrongType("kwargs")),
                            _ => Err(FrameError::WrongType("kwargs")),
                        })
                        .collect::<Result<_, _>>()?,
                    _ => return Err(FrameError::WrongType("kwargs")),
                },
            },
            21 => Message::Response {
                id: fields.string("id")?,
                success: match fields.take("success")? {
                    Value::Boolean(b) => b,
                    _ => return Err(FrameError::WrongType("success")),
                },
                data: fields.take("data")?,
            },
            22 => Message::Notification {
                kind: fields.string("type")?,
                data: fields.take("data")?,
            },
            other => return Err(FrameError::UnknownType(other)),
        })
    }
}

/// Field access on a decoded map; RedPepper's validator ignores unknown keys, so do we.
struct Fields(Vec<(Value, Value)>);

impl Fields {
    fn take(&mut self, name: &'static str) -> Result<Value, FrameError> {
        let position = self
            .0
            .iter()
            .position(|(k, _)| k.as_str() == Some(name))
            .ok_or(FrameError::MissingField(name))?;
        Ok(self.0.swap_remove(position).1)
    }

    fn string(&mut self, name: &'static str) -> Result<String, FrameError> {
        match self.take(name)? {
            Value::String(s) => s.into_str().ok_or(FrameError::WrongType(name)),
            _ => Err(FrameError::WrongType(name)),
        }
    }

    fn int(&mut self, name: &'static str) -> Result<i64, FrameError> {
        self.take(name)?.as_i64().ok_or(FrameError::WrongType(name))
    }
}

/// Why a frame was refused. Every variant closes the connection: a length-prefixed stream
/// cannot be trusted after a bad frame.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unknown message type {0}")]
    UnknownType(i64),
    #[error("message lacks the field `{0}`")]
    MissingField(&'static str),
    #[error("field `{0}` has the wrong type")]
    WrongType(&'static str),
}

impl FrameError {
    /// Stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            FrameError::TooLarge(_) => "too_large",
            FrameError::Malformed(_) => "malformed",
            FrameError::UnknownType(_) => "unknown_type",
            FrameError::MissingField(_) => "missing_field",
            FrameError::WrongType(_) => "wrong_type",
        }
    }
}

/// Encodes `message` as one frame (length prefix included).
pub fn encode(message: &Message) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    // Writing into a Vec cannot fail: rmpv's only errors are the writer's.
    let _ = rmpv::encode::write_value(&mut body, &message.to_value());
    let mut frame = Vec::with_capacity(body.len() + 4);
    // A body over 4 GiB (far over MAX_FRAME_LEN) gets a length the peer refuses, not one
    // wrapped around that would make it read the rest of the stream as frames.
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Decodes one frame body (without its length prefix).
pub fn decode_body(body: &[u8]) -> Result<Message, FrameError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut reader = body;
    let value = rmpv::decode::read_value_with_max_depth(&mut reader, MAX_DEPTH)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !reader.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} bytes after the message",
            reader.len()
        )));
    }
    Message::from_value(value)
}

/// Incremental decoder for a byte stream: feed whatever the socket returned, take frames out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the connection.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. A length above the limit
    /// is refused as soon as the 4 prefix bytes arrive, before any of the body is buffered.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        let Some(prefix) = self.buffer.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(len));
        }
        let Some(body) = self.buffer.get(4..4 + len) else {
            return Ok(None);
        };
        let result = decode_body(body);
        self.buffer.drain(..4 + len);
        result.map(Some)
    }

    /// The buffer itself, for reading straight into it (`AsyncReadExt::read_buf`), so a
    /// connection needs no read buffer of its own; bytes appended count as [`Self::extend`]ed.
    pub fn buffer_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}

impl crate::testing::Decoder for FrameDecoder {
    type Item<'a> = Result<Message, FrameError>;

    fn feed_read(&mut self, read: &[u8]) {
        self.extend(read);
    }

    fn next_item(&mut self) -> Option<Self::Item<'_>> {
        self.next_message().transpose()
    }

    fn is_fatal(item: &Self::Item<'_>) -> bool {
        item.is_err()
    }
}

/// Converts any serde value (a heartbeat, a config) into a MessagePack value for `data`.
pub fn to_value<T: serde::Serialize>(value: &T) -> Result<Value, FrameError> {
    rmpv::ext::to_value(value).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Converts a MessagePack `data` value into a serde type.
pub fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, FrameError> {
    rmpv::ext::from_value(value).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// The Response to request `id` for `result`: `Ok(data)` as a success, `Err(text)` as a
/// refusal carrying its text (both peers answer requests this way).
pub fn response(id: String, result: Result<Value, String>) -> Message {
    let (success, data) = match result {
        Ok(data) => (true, data),
        Err(text) => (false, Value::from(text)),
    };
    Message::Response { id, success, data }
}

/// What a Response says (the inverse of [`response`]): `data` on success, else the refusal's
/// text (a peer that sent no string gets its value written out).
pub fn response_result(success: bool, data: Value) -> Result<Value, String> {
    if success {
        return Ok(data);
    }
    Err(data
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| data.to_string()))
}

/// A serde struct as the `kwargs` of a Request (its fields by name: [`to_value`] writes a
/// struct as an array, so it goes through JSON's named fields).
pub fn to_kwargs<T: serde::Serialize>(value: &T) -> Result<Vec<(String, Value)>, FrameError> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(fields)) => fields
            .into_iter()
            .map(|(name, value)| Ok((name, to_value(&value)?)))
            .collect(),
        Ok(_) => Err(FrameError::WrongType("kwargs")),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// A Request's `kwargs` as a serde struct (the inverse of [`to_kwargs`]).
pub fn from_kwargs<T: serde::de::DeserializeOwned>(
    kwargs: Vec<(String, Value)>,
) -> Result<T, FrameError> {
    from_value(Value::Map(
        kwargs
            .into_iter()
            .map(|(name, value)| (Value::from(name), value))
            .collect(),
    ))
}

/// The `heartbeat` notification's payload, sent every heartbeat interval (`docs/architecture.md`,
/// "Control channel").
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Heartbeat {
    pub agent_id: String,
    pub gateway: String,
    pub pod: String,
    pub status: AgentStatus,
    /// Seconds since the agent started.
    pub uptime: u64,
    /// Percent of one core.
    pub cpu_usage: f64,
    /// Resident set size in bytes.
    pub memory_usage: u64,
    pub queue_depth: u64,
    pub spool_bytes: u64,
    pub received_total: u64,
    pub delivered_total: u64,
    pub rejected_total: u64,
    pub dead_lettered_total: u64,
    /// Messages dropped undelivered to make room in a full spool (`overflowPolicy:
    /// dropOldest`). Absent from agents that never drop.
    #[serde(default)]
    pub dropped_oldest_total: u64,
    pub upstream: UpstreamHealth,
    /// Generation of the gateway config the agent runs (for "N of M on the current config").
    #[serde(default)]
    pub config_generation: i64,
    /// RFC 3339 UTC.
    pub timestamp: String,
    /// The backlog (undelivered messages in the spool) has grown, net, over the agent's
    /// backlog window (`--backlog-window`): delivery is slower than ingest. Cleared once the
    /// backlog is back to its level at the start of the episode. Absent from older agents.
    #[serde(default)]
    pub backlogged: bool,
    /// While `backlogged`: how fast the backlog grew over the window, messages per second.
    #[serde(default)]
    pub backlog_growth_per_second: f64,
}

impl Heartbeat {
    /// A ready agent's heartbeat for simulated agents and tests (the agent builds its real one
    /// from its counters and clock): `received_total` messages received and as many delivered,
    /// the upstream's last call succeeded (`closed`), nothing queued, rejected or dropped, and
    /// a fixed timestamp. Callers change the fields they exercise.
    pub fn ready(agent_id: impl Into<String>, received_total: u64, config_generation: i64) -> Self {
        Heartbeat {
            agent_id: agent_id.into(),
            gateway: String::new(),
            pod: String::new(),
            status: AgentStatus::Ready,
            uptime: 1,
            cpu_usage: 0.0,
            memory_usage: 0,
            queue_depth: 0,
            spool_bytes: 0,
            received_total,
            delivered_total: received_total,
            rejected_total: 0,
            dead_lettered_total: 0,
            dropped_oldest_total: 0,
            upstream: UpstreamHealth {
                state: "closed".into(),
                last_error: None,
                last_success: None,
            },
            config_generation,
            timestamp: "2026-11-21T00:00:00Z".into(),
            backlogged: false,
            backlog_growth_per_second: 0.0,
        }
    }

    /// The heartbeat as the `data` of its notification: a map of named fields, as RedPepper
    /// sends its pydantic models.
    ///
    /// Compatibility rules (an agent and a hub of different versions must understand each
    /// other's heartbeats): a new field is added at the end, with `#[serde(default)]`, and
    /// never removed or retyped. A hub ignores the map keys it does not know (so an older hub
    /// reads a newer agent's heartbeat), and a field an older agent does not send takes its
    /// default — also in the positional array earlier agents sent (`to_value` of a struct),
    /// whose elements end where the newer fields begin.
    pub fn to_data(&self) -> Result<Value, FrameError> {
        // `to_value` gives the fields in declaration order, values encoded as before (enums
        // as their index); they are named here.
        let Value::Array(values) = to_value(self)? else {
            return Err(FrameError::Malformed("a heartbeat is not a struct".into()));
        };
        if values.len() != Self::FIELDS.len() {
            return Err(FrameError::Malformed("heartbeat fields out of date".into()));
        }
        Ok(Value::Map(
            Self::FIELDS
                .iter()
                .map(|name| Value::from(*name))
                .zip(values)
                .collect(),
        ))
    }

    /// The field names, in declaration order (a test keeps them in step with the struct).
    const FIELDS: &'static [&'static str] = &[
        "agent_id",
        "gateway",
        "pod",
        "status",
        "uptime",
        "cpu_usage",
        "memory_usage",
        "queue_depth",
        "spool_bytes",
        "received_total",
        "delivered_total",
        "rejected_total",
        "dead_lettered_total",
        "dropped_oldest_total",
        "upstream",
        "config_generation",
        "timestamp",
        "backlogged",
        "backlog_growth_per_second",
    ];

    /// Messages the agent will never deliver: refused at the socket, dead-lettered, or dropped
    /// to make room. The one definition of "dropped" in status and rates.
    pub fn dropped_total(&self) -> u64 {
        self.rejected_total
            .saturating_add(self.dead_lettered_total)
            .saturating_add(self.dropped_oldest_total)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    Starting,
    Ready,
    Degraded,
    Draining,
}

/// Request method (and, from agents before 0.2, notification kind) of [`LeftBehind`].
pub const LEFT_BEHIND: &str = "left_behind";

/// What a hub answers to a Request whose method it does not serve; an agent that sees it
/// falls back to sending [`LEFT_BEHIND`] as a notification (a hub from before 0.2).
pub const NO_SUCH_METHOD: &str = "the hub serves no method";

/// The `left_behind` request's `kwargs` (see [`to_kwargs`]): what an agent still held
/// undelivered when it stopped (its shutdown deadline passed). Sent once, just before the
/// agent's `Bye`, and only when `messages > 0`; the hub answers once it has recorded it, so the
/// agent knows the report arrived (a notification flushed into a connection the hub was
/// closing is lost without a trace). The messages stay in the agent's spool directory: they are lost unless
/// that volume outlives the pod (an `emptyDir` survives a container restart, not a deletion).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeftBehind {
    /// Messages accepted but not acknowledged by the platform.
    pub messages: u64,
    /// Their bytes in the spool.
    pub bytes: u64,
    /// Why they were left, e.g. `shutdown deadline`.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamHealth {
    /// Circuit state: `closed` (delivering), `open` (failing, backing off) or `half_open`.
    pub state: String,
    pub last_error: Option<String>,
    /// RFC 3339 UTC of the last acknowledged batch.
    pub last_success: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_carries_a_result_both_ways() {
        let ok = response("a-1".into(), Ok(Value::from(3)));
        assert_eq!(
            ok,
            Message::Response {
                id: "a-1".into(),
                success: true,
                data: Value::from(3)
            }
        );
        let Message::Response { success, data, .. } = response("a-2".into(), Err("no".into()))
        else {
            panic!("a response")
        };
        assert_eq!(response_result(success, data), Err("no".to_string()));
        assert_eq!(response_result(true, Value::from(3)), Ok(Value::from(3)));
        // A refusal that is not a string is still told, as written out.
        assert_eq!(response_result(false, Value::from(7)), Err("7".to_string()));
    }

    #[test]
    fn a_report_travels_as_kwargs_by_field_name() {
        let left = LeftBehind {
            messages: 10,
            bytes: 420,
            reason: "shutdown deadline".into(),
        };
        let kwargs = to_kwargs(&left).unwrap();
        let mut names: Vec<&str> = kwargs.iter().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["bytes", "messages", "reason"]);
        assert_eq!(from_kwargs::<LeftBehind>(kwargs).unwrap(), left);
        // What a peer sends is checked: a missing or mistyped field is an error, not a default.
        let missing = vec![("messages".to_string(), Value::from(1))];
        assert!(from_kwargs::<LeftBehind>(missing).is_err());
        let mistyped = vec![
            ("messages".to_string(), Value::from("ten")),
            ("bytes".to_string(), Value::from(1)),
            ("reason".to_string(), Value::from("x")),
        ];
        assert!(from_kwargs::<LeftBehind>(mistyped).is_err());
        assert!(to_kwargs(&7u32).is_err(), "only a struct has kwargs");
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::AgentHello {
                id: "uid".into(),
                version: "0.1.0".into(),
                credentials: "tok".into(),
            },
            Message::ManagerHello {
                version: "0.1.0".into(),
            },
            Message::Ping { data: 123_456 },
            Message::Pong { data: -1 },
            Message::Bye {
                reason: "authentication failed".into(),
            },
            Message::Request {
                id: "r1".into(),
                method: "reload".into(),
                args: vec!["a".into()],
                kwargs: vec![("generation".into(), Value::from(3))],
            },
            Message::Response {
                id: "r1".into(),
                success: false,
                data: Value::from("boom"),
            },
            Message::Notification {
                kind: "heartbeat".into(),
                data: Value::Nil,
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_a_byte_at_a_time_stream() {
        let stream: Vec<u8> = all_messages().iter().flat_map(encode).collect();
        let mut decoder = FrameDecoder::new();
        let mut decoded = Vec::new();
        for byte in stream {
            decoder.extend(&[byte]);
            while let Some(message) = decoder.next_message().expect("valid stream") {
                decoded.push(message);
            }
        }
        assert_eq!(decoded, all_messages());
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let mut decoder = FrameDecoder::new();
        decoder.extend(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes());
        assert_eq!(
            decoder.next_message(),
            Err(FrameError::TooLarge(MAX_FRAME_LEN + 1))
        );
    }

    #[test]
    fn hostile_bodies_are_errors() {
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("not a map", vec![0x93, 1, 2, 3], "malformed"),
            ("truncated", vec![0x82, 0xa1, b't'], "malformed"),
            (
                "trailing bytes",
                [encode(&Message::Pong { data: 1 })[4..].to_vec(), vec![0xc0]].concat(),
                "malformed",
            ),
            ("unknown type", vec![0x81, 0xa1, b't', 99], "unknown_type"),
            ("missing field", vec![0x81, 0xa1, b't', 12], "missing_field"),
            (
                "wrong type",
                vec![
                    0x82, 0xa1, b't', 12, 0xa4, b'd', b'a', b't', b'a', 0xa1, b'x',
                ],
                "wrong_type",
            ),
            (
                "deep nesting",
                [
                    vec![0x82, 0xa1, b't', 22, 0xa4, b'd', b'a', b't', b'a'],
                    vec![0x91; 100],
                    vec![0xc0],
                ]
                .concat(),
                "malformed",
            ),
            (
                "huge array claim",
                vec![0xdd, 0xff, 0xff, 0xff, 0xff],
                "malformed",
            ),
        ];
        for (name, body, label) in cases {
            let error = decode_body(&body).expect_err(name);
            assert_eq!(error.metric_label(), label, "{name}: {error}");
        }
    }

    fn heartbeat() -> Heartbeat {
        Heartbeat {
            gateway: "demo".into(),
            pod: "ns/pod".into(),
            uptime: 5,
            cpu_usage: 0.5,
            memory_usage: 4 << 20,
            queue_depth: 7,
            backlogged: true,
            backlog_growth_per_second: 12.5,
            ..Heartbeat::ready("uid", 10, 2)
        }
    }

    #[test]
    fn heartbeat_survives_the_data_field() {
        let heartbeat = heartbeat();
        let message = Message::Notification {
            kind: "heartbeat".into(),
            data: heartbeat.to_data().unwrap(),
        };
        let Message::Notification { data, .. } = decode_body(&encode(&message)[4..]).unwrap()
        else {
            panic!("not a notification")
        };
        assert!(matches!(data, Value::Map(_)), "named fields: {data:?}");
        // The names are the struct's, in its order.
        let json = serde_json::to_value(&heartbeat).unwrap();
        let mut names: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut fields = Heartbeat::FIELDS.to_vec();
        names.sort_unstable();
        fields.sort_unstable();
        assert_eq!(names, fields);
        let Value::Map(entries) = &data else {
            unreachable!()
        };
        assert_eq!(
            entries[3].1,
            to_value(&AgentStatus::Ready).unwrap(),
            "values encoded as before"
        );
        assert_eq!(from_value::<Heartbeat>(data).unwrap(), heartbeat);
    }

    /// The compatibility rules of [`Heartbeat::to_data`]: an older hub ignores fields it does
    /// not know; a newer hub fills in what an older agent did not send, map or array.
    #[test]
    fn heartbeats_of_other_versions_are_understood() {
        let heartbeat = heartbeat();
        // An older hub: the newer agent's map has keys it does not know.
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct OlderHeartbeat {
            agent_id: String,
            queue_depth: u64,
            upstream: UpstreamHealth,
            timestamp: String,
        }
        let old: OlderHeartbeat = from_value(heartbeat.to_data().unwrap()).unwrap();
        assert_eq!((old.agent_id.as_str(), old.queue_depth), ("uid", 7));
        // A newer hub, an older agent: no backlog fields, as a map and as the positional array.
        let Value::Map(entries) = heartbeat.to_data().unwrap() else {
            panic!("not a map")
        };
        let older_map = Value::Map(
            entries
                .into_iter()
                .filter(|(k, _)| !k.as_str().is_some_and(|k| k.starts_with("backlog")))
                .collect(),
        );
        let Value::Array(mut items) = to_value(&heartbeat).unwrap() else {
            panic!("to_value of a struct is an array")
        };
        items.truncate(items.len() - 2);
        for older in [older_map, Value::Array(items)] {
            let decoded: Heartbeat = from_value(older).unwrap();
            assert!(!decoded.backlogged);
            assert_eq!(decoded.backlog_growth_per_second, 0.0);
            assert_eq!(decoded.queue_depth, 7);
        }
    }

    /// Differential property tests (issue 15): the same bytes fed whole, one byte at a time and
    /// cut at arbitrary chunk boundaries decode to the same messages and the same first error.
    mod chunking {
        use super::*;
        use crate::testing::{chunks, decode_reads};
        use proptest::prelude::*;
        use proptest::sample::Index;

        /// Messages decoded from `chunks`, ending with the first error (the hub and the agent
        /// close the connection on it), and what is left buffered.
        fn decode(chunks: &[&[u8]]) -> (Vec<Result<Message, FrameError>>, usize) {
            let mut decoder = FrameDecoder::new();
            let out = decode_reads(&mut decoder, chunks, |item| item);
            (out, decoder.buffered())
        }

        /// Whole, byte at a time and at `cuts`: the messages and first error must agree (and,
        /// without an error, what stays buffered); returns the whole result.
        fn decode_every_way(input: &[u8], cuts: &[Index]) -> Vec<Result<Message, FrameError>> {
            let (whole, left) = decode(&[input]);
            let failed = matches!(whole.last(), Some(Err(_)));
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            for (how, (out, rest)) in [
                ("byte at a time", decode(&bytes)),
                ("chunked", decode(&chunks(input, cuts))),
            ] {
                assert_eq!(out, whole, "{how}");
                if !failed {
                    assert_eq!(rest, left, "{how}: bytes left buffered");
                }
            }
            whole
        }

        /// A MessagePack value for `data` and `kwargs`: every kind a peer may send (floats
        /// finite, so values compare equal), nested a few levels.
        fn mp_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Nil),
                any::<bool>().prop_map(Value::Boolean),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                (-1e9f64..1e9).prop_map(Value::F64),
                (-1e3f32..1e3).prop_map(Value::F32),
                ".{0,6}".prop_map(Value::from),
                proptest::collection::vec(any::<u8>(), 0..6).prop_map(Value::Binary),
                (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..4))
                    .prop_map(|(t, d)| Value::Ext(t, d)),
            ];
            leaf.prop_recursive(3, 16, 3, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                    proptest::collection::vec((inner.clone(), inner), 0..3).prop_map(Value::Map),
                ]
            })
        }

        fn message() -> impl Strategy<Value = Message> {
            let text = || ".{0,8}";
            prop_oneof![
                (text(), text(), text()).prop_map(|(id, version, credentials)| {
                    Message::AgentHello {
                        id,
                        version,
                        credentials,
                    }
                }),
                text().prop_map(|version| Message::ManagerHello { version }),
                any::<i64>().prop_map(|data| Message::Ping { data }),
                any::<i64>().prop_map(|data| Message::Pong { data }),
                text().prop_map(|reason| Message::Bye { reason }),
                (
                    text(),
                    text(),
                    proptest::collection::vec(text(), 0..3),
                    proptest::collection::vec((text(), mp_value()), 0..3),
                )
                    .prop_map(|(id, method, args, kwargs)| Message::Request {
                        id,
                        method,
                        args,
                        kwargs,
                    }),
                (text(), any::<bool>(), mp_value())
                    .prop_map(|(id, success, data)| Message::Response { id, success, data }),
                (text(), mp_value()).prop_map(|(kind, data)| Message::Notification { kind, data }),
            ]
        }

        /// A piece of a hostile stream: valid frames, frames with a corrupt body, length
        /// prefixes over the limit or longer than what follows, and random bytes.
        fn hostile_piece() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                3 => message().prop_map(|m| encode(&m)),
                // A valid frame with one byte of its body changed.
                2 => (message(), any::<Index>(), any::<u8>()).prop_map(|(m, at, byte)| {
                    let mut frame = encode(&m);
                    let i = 4 + at.index(frame.len() - 4);
                    frame[i] = byte;
                    frame
                }),
                // A valid frame whose prefix claims a different length.
                1 => (message(), 0u32..64).prop_map(|(m, len)| {
                    let mut frame = encode(&m);
                    frame[..4].copy_from_slice(&len.to_be_bytes());
                    frame
                }),
                // Bodies that are not messages.
                1 => proptest::collection::vec(any::<u8>(), 0..12).prop_map(|body| {
                    [&(body.len() as u32).to_be_bytes()[..], &body].concat()
                }),
                1 => ((MAX_FRAME_LEN as u32 + 1)..=u32::MAX)
                    .prop_map(|len| len.to_be_bytes().to_vec()),
                1 => Just(((MAX_FRAME_LEN as u32).to_be_bytes()).to_vec()),
                1 => proptest::collection::vec(any::<u8>(), 0..12),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// A valid stream decodes to exactly its messages, however it is cut, and leaves
            /// nothing buffered.
            #[test]
            fn valid_streams_decode_the_same_however_they_are_cut(
                messages in proptest::collection::vec(message(), 0..8),
                cuts in proptest::collection::vec(any::<Index>(), 0..12),
            ) {
                let input: Vec<u8> = messages.iter().flat_map(encode).collect();
                let want: Vec<Result<Message, FrameError>> =
                    messages.into_iter().map(Ok).collect();
                prop_assert_eq!(decode_every_way(&input, &cuts), want);
                prop_assert_eq!(decode(&[&input]).1, 0);
            }

            /// Any stream gives the same messages and the same first error, however it is cut.
            #[test]
            fn hostile_streams_give_the_same_error_however_they_are_cut(
                pieces in proptest::collection::vec(hostile_piece(), 0..8),
                cuts in proptest::collection::vec(any::<Index>(), 0..12),
            ) {
                decode_every_way(&pieces.concat(), &cuts);
            }
        }
    }
}
