//! Frames of the sidecar's optional TCP listener (the "SecureAgentMessaging" frame shape, with
//! the framing, auth and acknowledgements it lacked). No I/O happens here: the listener feeds
//! bytes in and gets typed frames or errors out, and builds its replies with the `write_*`
//! functions, so the fuzz target exercises exactly this code.
//!
//! Framing: one JSON object per line, `\n`-terminated (a `\r` before it is tolerated, blank
//! lines are skipped). A line may arrive split across any number of reads, and one read may
//! carry many lines; the decoder keeps the unfinished tail. A line longer than the frame limit
//! is fatal (the connection is answered and closed), so a peer cannot make the sidecar buffer
//! without bound.
//!
//! Frame: `{"type": …, "payload": …, "timestamp": …, "id": …}`; `timestamp` is ignored on
//! input (the sidecar stamps messages itself) and is milliseconds since the Unix epoch on
//! output, as in the seed. `id` (a string or a number, at most [`MAX_ID_BYTES`], that a strict JSON
//! parser reads) is echoed in the reply to the frame. Types from the peer:
//!
//! | type | payload | answer |
//! |---|---|---|
//! | `data` | an app socket message (`{"msg_type":"publish",…}`, see `docs/architecture.md`) | `ack` once appended to the spool, else `error` |
//! | `ping` | anything | `pong` with the same id |
//! | `pong`, `keepalive` | anything | none (they only prove the peer is alive) |
//! | `close` | anything | `close`, then the sidecar closes the connection |
//! | `auth` | — (`token` field) | `auth` with `{"status":"ok"}`, or `error` and close |
//!
//! Types from the sidecar: `ack`, `error` (payload `{"status":"error","message":…}`, the app
//! socket's error reply), `pong`, `keepalive`, `close` (payload `{"reason":…}`), `auth`.

// Input comes from peers: no panicking accessors outside tests (issue 15).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::io::Write as _;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use crate::app::{self, AnyValue, AppError, CowStr, Limits, Publish, Request};
use crate::read_buffer::ReadBuffer;

/// Bytes a frame may add around its payload (type, id, timestamp, token, whitespace): the
/// frame limit is the message limit plus this.
pub const FRAME_OVERHEAD: usize = 4096;
/// Frame limit before the peer has authenticated: an `auth` frame is small, and an
/// unauthenticated peer should not be able to make the sidecar buffer a megabyte.
pub const AUTH_MAX_FRAME: usize = 4096;
/// Longest `id` (its JSON text) echoed back.
pub const MAX_ID_BYTES: usize = 256;

/// A decoded frame; `id` is the JSON text of the frame's id (a string or a number) when it
/// had one, to be echoed with [`write_frame`].
#[derive(Debug)]
pub struct Frame<'a> {
    pub id: Option<&'a [u8]>,
    pub kind: FrameKind<'a>,
}

/// What a frame asks for.
#[derive(Debug)]
pub enum FrameKind<'a> {
    /// A validated `publish` (wait:false) to append to the spool.
    Data(Publish<'a>),
    Ping,
    Pong,
    Keepalive,
    Close,
    Auth {
        token: CowStr<'a>,
    },
}

/// Everything a frame can be answered with as an `error` frame.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("invalid frame: {0}")]
    InvalidFrame(String),
    #[error("missing frame type")]
    MissingType,
    #[error("unknown frame type: {0}")]
    UnknownType(String),
    #[error("frame too large: more than {max} bytes without a newline")]
    TooLarge { max: usize },
    #[error("{0}")]
    Unsupported(&'static str),
    #[error(
        "unauthorized: the first frame must be {{\"type\":\"auth\",\"token\":\"…\"}} with the listener's token"
    )]
    Unauthorized,
    /// The `data` payload was not a valid app message: the app socket's own error.
    #[error(transparent)]
    App(AppError),
}

impl FrameError {
    /// Metric label (`rejected_total{reason}`); app message errors keep the socket's labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidFrame(_) => "invalid_frame",
            Self::MissingType => "missing_frame_type",
            Self::UnknownType(_) => "unknown_frame_type",
            Self::TooLarge { .. } => "frame_too_large",
            Self::Unsupported(_) => "unsupported",
            Self::Unauthorized => "unauthorized",
            Self::App(e) => e.reason(),
        }
    }
}

/// One step of [`FrameDecoder::next`].
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A complete, valid frame.
    Frame(Frame<'a>),
    /// A complete line that is not a valid frame: answer the error (with the id when the
    /// frame had a readable one) and go on with the next line.
    Rejected {
        id: Option<&'a [u8]>,
        error: FrameError,
    },
    /// A line over the frame limit: answer the error, then close.
    Fatal(FrameError),
    /// No complete line buffered; read more bytes.
    NeedMore,
}

/// The frame's fields as received; unknown fields (including `timestamp`) are ignored.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<CowStr<'a>>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<CowStr<'a>>,
}

/// Incremental decoder for a stream of newline-delimited JSON frames.
#[derive(Debug)]
pub struct FrameDecoder {
    /// What reads brought in; its consumed position is the start of the next line.
    pub input: ReadBuffer,
    /// This many bytes after the next line's start hold no newline: scanning resumes after
    /// them, so a long line arriving in small reads is scanned once, not once per read.
    scanned: usize,
    max_frame: usize,
    limits: Limits,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder for `data` payloads up to `limits.max_message_bytes`, lines up to that plus
    /// [`FRAME_OVERHEAD`].
    pub fn new(limits: Limits) -> Self {
        Self {
            input: ReadBuffer::default(),
            scanned: 0,
            max_frame: limits.max_message_bytes.saturating_add(FRAME_OVERHEAD),
            limits,
            failed: false,
        }
    }

    /// Longest accepted line in bytes (excluding the `\n`).
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the line limit (e.g. [`AUTH_MAX_FRAME`] until the peer authenticated).
    pub fn set_max_frame(&mut self, max: usize) {
        self.max_frame = max;
    }

    /// True once a fatal error was returned; nothing more will be decoded.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Decodes the next complete line, if any.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Decoded<'_> {
        if self.failed {
            return Decoded::NeedMore;
        }
        loop {
            let from = self.input.pos + self.scanned;
            let unscanned = self.input.buf.get(from..).unwrap_or_default();
            let Some(nl) = unscanned.iter().position(|&b| b == b'\n') else {
                self.scanned = self.input.buffered();
                if self.scanned > self.max_frame {
                    self.failed = true;
                    return Decoded::Fatal(FrameError::TooLarge {
                        max: self.max_frame,
                    });
                }
                return Decoded::NeedMore;
            };
            let end = from + nl;
            let start = self.input.pos;
            self.input.pos = end + 1;
            self.scanned = 0;
            if end - start > self.max_frame {
                self.failed = true;
                return Decoded::Fatal(FrameError::TooLarge {
                    max: self.max_frame,
                });
            }
            let line = self.input.buf.get(start..end).unwrap_or_default();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return parse_line(line, &self.limits);
        }
    }
}

crate::testing::impl_decoder!(FrameDecoder, Decoded);

/// Parses one line (without its `\n`) into a frame.
pub fn parse_line<'a>(line: &'a [u8], limits: &Limits) -> Decoded<'a> {
    let first = line.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // serde would read `[…]` as a struct in tuple form; a frame is an object.
        return Decoded::Rejected {
            id: None,
            error: match serde_json::from_slice::<IgnoredAny>(line) {
                Ok(_) => FrameError::InvalidFrame("a frame is a JSON object".into()),
                Err(e) => FrameError::InvalidJson(strip_location(&e.to_string()).into()),
            },
        };
    }
    let raw: RawFrame = match serde_json::from_slice(line) {
        Ok(f) => f,
        Err(e) if e.is_data() => {
            return Decoded::Rejected {
                id: None,
                error: FrameError::InvalidFrame(strip_location(&e.to_string()).into()),
            };
        }
        Err(e) => {
            return Decoded::Rejected {
                id: None,
                error: FrameError::InvalidJson(strip_location(&e.to_string()).into()),
            };
        }
    };
    let id = match raw.id.map(|v| v.get().as_bytes()) {
        None => None,
        Some(b) if b.len() > MAX_ID_BYTES => {
            return Decoded::Rejected {
                id: None,
                error: FrameError::InvalidFrame(format!("id longer than {MAX_ID_BYTES} bytes")),
            };
        }
        // The id is echoed as received, so it must be text a strict parser reads: the raw
        // value skipped escapes and numbers without decoding them (`"\ud800"`, `1e400`).
        Some(b) if matches!(b.first(), Some(b'"' | b'-' | b'0'..=b'9')) => {
            if let Err(e) = serde_json::from_slice::<AnyValue>(b) {
                return Decoded::Rejected {
                    id: None,
                    error: FrameError::InvalidFrame(format!(
                        "id is not valid JSON: {}",
                        strip_location(&e.to_string())
                    )),
                };
            }
            Some(b)
        }
        Some(_) => {
            return Decoded::Rejected {
                id: None,
                error: FrameError::InvalidFrame("id must be a string or a number".into()),
            };
        }
    };
    let reject = |error| Decoded::Rejected { id, error };
    let Some(kind) = raw.kind else {
        return reject(FrameError::MissingType);
    };
    let kind = match kind.as_str() {
        "data" => match raw.payload {
            None => {
                return reject(FrameError::InvalidFrame(
                    "data frame without payload".into(),
                ));
            }
            Some(p) => match parse_data(p.get().as_bytes(), limits) {
                Ok(publish) => FrameKind::Data(publish),
                Err(e) => return reject(e),
            },
        },
        "ping" => FrameKind::Ping,
        "pong" => FrameKind::Pong,
        "keepalive" => FrameKind::Keepalive,
        "close" => FrameKind::Close,
        "auth" => match raw.token {
            Some(token) => FrameKind::Auth { token },
            None => return reject(FrameError::InvalidFrame("auth frame without token".into())),
        },
        other => {
            let mut name: String = other.chars().take(64).collect();
            if name.len() < other.len() {
                name.push('…');
            }
            return reject(FrameError::UnknownType(name));
        }
    };
    Decoded::Frame(Frame { id, kind })
}

/// Validates a `data` payload exactly as the app socket validates a message.
fn parse_data<'a>(payload: &'a [u8], limits: &Limits) -> Result<Publish<'a>, FrameError> {
    match app::parse_message(payload, limits).map_err(FrameError::App)? {
        Request::Publish(p) if !p.wait => Ok(p),
        Request::Publish(_) => Err(FrameError::Unsupported(
            "context.wait:true is not served over TCP (the ack confirms acceptance); use the app socket to wait for the platform's reply",
        )),
        Request::MsgCheck { .. } => Err(FrameError::Unsupported(
            "msg_check is not served over TCP; use the app socket",
        )),
    }
}

/// serde_json appends " at line L column C"; positions mean little to the peer and make
/// replies differ between identical frames.
fn strip_location(s: &str) -> &str {
    s.rsplit_once(" at line ").map_or(s, |(message, _)| message)
}

/// Appends `{"type":<kind>,"id":<id>,"payload":<payload>,"timestamp":<ms>}\n` to `out`.
/// `id` is the id's JSON text as decoded ([`Frame::id`]); `payload` is JSON text.
pub fn write_frame(
    out: &mut Vec<u8>,
    kind: &str,
    id: Option<&[u8]>,
    payload: Option<&[u8]>,
    timestamp_ms: u64,
) {
    out.extend_from_slice(b"{\"type\":");
    push_json_str(out, kind);
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        out.extend_from_slice(id);
    }
    if let Some(p) = payload {
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(p);
    }
    let _ = writeln!(out, ",\"timestamp\":{timestamp_ms}}}");
}

/// Appends `value` as a JSON string. Serialising a `str` into a `Vec` cannot fail (no I/O, and
/// every string has a JSON form), so there is no error to handle.
fn push_json_str(out: &mut Vec<u8>, value: &str) {
    let _ = serde_json::to_writer(out, value);
}

/// `ack`: the data frame's message is appended to the spool (accepted).
pub fn write_ack(out: &mut Vec<u8>, id: Option<&[u8]>, timestamp_ms: u64) {
    write_frame(out, "ack", id, None, timestamp_ms);
}

/// `error` with the app socket's error reply as payload.
pub fn write_error(out: &mut Vec<u8>, id: Option<&[u8]>, message: &str, timestamp_ms: u64) {
    write_frame(
        out,
        "error",
        id,
        Some(&app::error_reply(message)),
        timestamp_ms,
    );
}

/// `pong` answering a `ping`.
pub fn write_pong(out: &mut Vec<u8>, id: Option<&[u8]>, timestamp_ms: u64) {
    write_frame(out, "pong", id, Some(br#"{"status":"ok"}"#), timestamp_ms);
}

/// `auth` accepting the peer's token.
pub fn write_auth_ok(out: &mut Vec<u8>, id: Option<&[u8]>, timestamp_ms: u64) {
    write_frame(out, "auth", id, Some(br#"{"status":"ok"}"#), timestamp_ms);
}

/// `keepalive` sent every keep-alive interval.
pub fn write_keepalive(out: &mut Vec<u8>, timestamp_ms: u64) {
    write_frame(out, "keepalive", None, None, timestamp_ms);
}

/// `close` with `{"reason":…}`; the sidecar closes the connection after writing it.
pub fn write_close(out: &mut Vec<u8>, id: Option<&[u8]>, reason: &str, timestamp_ms: u64) {
    let mut payload = b"{\"reason\":".to_vec();
    push_json_str(&mut payload, reason);
    payload.push(b'}');
    write_frame(out, "close", id, Some(&payload), timestamp_ms);
}

/// Compares a presented token with the expected one in time independent of where they
/// differ (the length is not secret).
pub fn token_matches(expected: &[u8], presented: &[u8]) -> bool {
    if expected.len() != presented.len() {
        return false;
    }
    let diff = expected
        .iter()
        .zip(presented)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn summary(d: Decoded<'_>) -> Option<String> {
        let id = |id: Option<&[u8]>| id.map(|b| String::from_utf8_lossy(b).into_owned());
        Some(match d {
            Decoded::NeedMore => return None,
            Decoded::Frame(f) => {
                let kind = match f.kind {
                    FrameKind::Data(p) => {
                        format!(
                            "data {}",
                            String::from_utf8(p.to_envelope("T", "s")).unwrap()
                        )
                    }
                    FrameKind::Ping => "ping".into(),
                    FrameKind::Pong => "pong".into(),
                    FrameKind::Keepalive => "keepalive".into(),
                    FrameKind::Close => "close".into(),
                    FrameKind::Auth { token } => format!("auth {}", token.as_str()),
                };
                format!("{kind} id={:?}", id(f.id))
            }
            Decoded::Rejected { id: i, error } => format!("rejected {error} id={:?}", id(i)),
            Decoded::Fatal(e) => format!("fatal {}", e.reason()),
        })
    }

    fn run(limits: Limits, chunks: &[&[u8]]) -> Vec<String> {
        feed_all(FrameDecoder::new(limits), chunks)
    }

    /// Feeds `chunks` one at a time, summarising every step after each.
    fn feed_all(mut d: FrameDecoder, chunks: &[&[u8]]) -> Vec<String> {
        crate::testing::decode_reads(&mut d, chunks, |step| summary(step).unwrap_or_default())
    }

    const STREAM: &[u8] = b"{\"type\":\"data\",\"id\":\"a1\",\"timestamp\":1700000000000,\"payload\":{\"msg_type\":\"publish\",\"data\":{\"k\":\"v\\n\"}}}\n\
        {\"type\":\"ping\",\"id\":7}\r\n\
        \n\
        {\"type\":\"keepalive\"}\n\
        {\"type\":\"close\",\"id\":\"bye\",\"payload\":{\"reason\":\"done\"}}\n";

    #[test]
    fn coalesced_frames() {
        assert_eq!(
            run(Limits::default(), &[STREAM]),
            [
                r#"data {"msg_type":"publish","data":{"k":"v\n"},"timestamp":"T","source":"s"} id=Some("\"a1\"")"#,
                "ping id=Some(\"7\")",
                "keepalive id=None",
                "close id=Some(\"\\\"bye\\\"\")",
            ]
        );
    }

    #[test]
    fn every_split_point_and_byte_at_a_time_give_the_same_result() {
        let whole = run(Limits::default(), &[STREAM]);
        for split in 0..=STREAM.len() {
            assert_eq!(
                run(Limits::default(), &[&STREAM[..split], &STREAM[split..]]),
                whole,
                "split {split}"
            );
        }
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(run(Limits::default(), &bytes), whole);
    }

    #[test]
    fn errors_are_answered_and_the_stream_goes_on() {
        let limits = Limits {
            max_message_bytes: 100,
            max_tags: 2,
        };
        let cases: &[(&str, &str)] = &[
            (
                "{nope",
                "rejected invalid JSON: key must be a string id=None",
            ),
            (
                "[1,2]",
                "rejected invalid frame: a frame is a JSON object id=None",
            ),
            (
                "\"x\"",
                "rejected invalid frame: a frame is a JSON object id=None",
            ),
            ("{\"id\":1}", "rejected missing frame type id=Some(\"1\")"),
            (
                "{\"type\":\"nope\",\"id\":\"q\"}",
                "rejected unknown frame type: nope id=Some(\"\\\"q\\\"\")",
            ),
            (
                "{\"type\":5}",
                "rejected invalid frame: invalid type: integer `5`, expected a string id=None",
            ),
            (
                "{\"type\":\"ping\",\"id\":{}}",
                "rejected invalid frame: id must be a string or a number id=None",
            ),
            // Ids are echoed as received, so an id a strict JSON parser refuses (a lone
            // surrogate, a number beyond a 64-bit float) would make every reply unreadable.
            (
                "{\"type\":\"ping\",\"id\":\"\\ud800\"}",
                "rejected invalid frame: id is not valid JSON: unexpected end of hex escape id=None",
            ),
            (
                "{\"type\":\"ping\",\"id\":1e400}",
                "rejected invalid frame: id is not valid JSON: number out of range id=None",
            ),
            (
                "{\"type\":\"data\",\"id\":2}",
                "rejected invalid frame: data frame without payload id=Some(\"2\")",
            ),
            (
                "{\"type\":\"data\",\"id\":3,\"payload\":\"s\"}",
                "rejected invalid message: expected a JSON object id=Some(\"3\")",
            ),
            (
                "{\"type\":\"data\",\"id\":4,\"payload\":{\"data\":1}}",
                "rejected missing msg_type id=Some(\"4\")",
            ),
            (
                "{\"type\":\"data\",\"id\":5,\"payload\":{\"msg_type\":\"publish\",\"context\":{\"tags\":[\"a\",\"b\",\"c\"]}}}",
                "rejected too many tags provided; maximum is 2 id=Some(\"5\")",
            ),
            (
                "{\"type\":\"data\",\"id\":6,\"payload\":{\"msg_type\":\"msg_check\"}}",
                "rejected msg_check is not served over TCP; use the app socket id=Some(\"6\")",
            ),
            (
                "{\"type\":\"data\",\"payload\":{\"msg_type\":\"publish\",\"data\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}}",
                "rejected message too large: 127 bytes exceeds the limit of 100 bytes id=None",
            ),
            (
                "{\"type\":\"auth\"}",
                "rejected invalid frame: auth frame without token id=None",
            ),
            (
                "{\"type\":\"ping\"} {\"type\":\"ping\"}",
                "rejected invalid JSON: trailing characters id=None",
            ),
            (
                "{\"type\":\"pi\u{ff}ng\"}",
                "rejected unknown frame type: piÿng id=None",
            ),
        ];
        for (line, want) in cases {
            let input = format!("{line}\n{{\"type\":\"pong\"}}\n");
            assert_eq!(
                run(limits, &[input.as_bytes()]),
                [*want, "pong id=None"],
                "line {line}"
            );
        }
        // Not UTF-8: invalid JSON, and the next line is still read.
        assert_eq!(
            run(limits, &[b"{\"type\":\"p\xffng\"}\n{\"type\":\"pong\"}\n"]),
            [
                "rejected invalid JSON: invalid unicode code point id=None",
                "pong id=None"
            ]
        );
    }

    /// Every reply the listener builds for a frame, whatever the frame held, is one line a
    /// strict JSON parser reads (the fuzz target's check, on the input that first broke it).
    #[test]
    fn replies_to_any_frame_are_json_a_strict_parser_reads() {
        let input: &[u8] = b"{\"type\":\"close\",\"id\":\"\\ud800\"}\n\
            {\"type\":\"ping\",\"id\":\"\\udc00\"}\n{\"type\":\"ping\",\"id\":-1e999}\n\
            {\"type\":\"nope\",\"id\":\"\\ud83d\\ude00\"}\n{\"type\":\"ping\",\"id\":1.5e3}\n";
        let mut d = FrameDecoder::new(Limits::default());
        d.input.feed(input);
        let mut replies = 0;
        loop {
            let mut reply = Vec::new();
            match d.next() {
                Decoded::NeedMore => break,
                Decoded::Frame(f) => write_pong(&mut reply, f.id, 1),
                Decoded::Rejected { id, error } => {
                    write_error(&mut reply, id, &error.to_string(), 1)
                }
                Decoded::Fatal(e) => write_error(&mut reply, None, &e.to_string(), 1),
            }
            let text = String::from_utf8_lossy(&reply);
            assert!(
                serde_json::from_slice::<Value>(&reply).is_ok(),
                "not JSON: {text}"
            );
            replies += 1;
        }
        assert_eq!(replies, 5);
    }

    #[test]
    fn oversized_lines_are_fatal_whole_or_partial() {
        let limits = Limits {
            max_message_bytes: 64,
            max_tags: 10,
        };
        let mut d = FrameDecoder::new(limits);
        assert_eq!(d.max_frame(), 64 + FRAME_OVERHEAD);
        d.set_max_frame(20);
        d.input.feed(b"{\"type\":\"ping\"}\n{\"type\":\"data\",");
        assert!(matches!(d.next(), Decoded::Frame(_)));
        assert!(matches!(d.next(), Decoded::NeedMore));
        d.input.feed(b"\"payload\":{}}");
        assert!(matches!(
            d.next(),
            Decoded::Fatal(FrameError::TooLarge { max: 20 })
        ));
        assert!(d.failed());
        d.input.feed(b"\n{\"type\":\"ping\"}\n");
        assert!(matches!(d.next(), Decoded::NeedMore), "nothing after fatal");

        let mut d = FrameDecoder::new(limits);
        d.set_max_frame(20);
        d.input.feed(b"{\"type\":\"ping\",\"id\":\"0123456789\"}\n");
        assert!(matches!(d.next(), Decoded::Fatal(_)));
    }

    #[test]
    fn long_line_in_small_reads_is_scanned_once() {
        let mut d = FrameDecoder::new(Limits::default());
        let line = format!(
            "{{\"type\":\"data\",\"payload\":{{\"msg_type\":\"publish\",\"data\":\"{}\"}}}}\n",
            "x".repeat(100_000)
        );
        let mut frames = 0;
        for c in line.as_bytes().chunks(7) {
            d.input.feed(c);
            loop {
                match d.next() {
                    Decoded::NeedMore => break,
                    Decoded::Frame(_) => frames += 1,
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(frames, 1);
        assert_eq!(d.input.buffered(), 0);
    }

    #[test]
    fn replies_are_one_json_line_each() {
        let mut out = Vec::new();
        write_ack(&mut out, Some(b"\"a1\""), 5);
        write_error(&mut out, Some(b"7"), "bad \"thing\"", 6);
        write_pong(&mut out, None, 7);
        write_keepalive(&mut out, 8);
        write_close(&mut out, Some(b"\"x\""), "keep-alive timeout", 9);
        write_auth_ok(&mut out, None, 10);
        let lines: Vec<Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                json!({"type":"ack","id":"a1","timestamp":5}),
                json!({"type":"error","id":7,"payload":{"status":"error","message":"bad \"thing\""},"timestamp":6}),
                json!({"type":"pong","payload":{"status":"ok"},"timestamp":7}),
                json!({"type":"keepalive","timestamp":8}),
                json!({"type":"close","id":"x","payload":{"reason":"keep-alive timeout"},"timestamp":9}),
                json!({"type":"auth","payload":{"status":"ok"},"timestamp":10}),
            ]
        );
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 6);
    }

    #[test]
    fn tokens() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        assert!(!token_matches(b"s3cret", b"s3creT"));
        assert!(!token_matches(b"s3cret", b"s3cre"));
        assert!(!token_matches(b"s3cret", b""));
    }

    /// Differential property tests (issue 15): the same bytes fed whole, one byte at a time and
    /// cut at arbitrary chunk boundaries decode to the same frames and the same errors.
    mod chunking {
        use super::*;
        use crate::testing::chunks;
        use proptest::prelude::*;
        use proptest::sample::Index;

        /// Small limits for hostile streams, so oversized payloads and lines are reached.
        const LIMITS: Limits = Limits {
            max_message_bytes: 96,
            max_tags: 3,
        };

        /// Decodes `input` fed as `chunks` with the frame limit `max_frame` (`None`: default).
        fn decode(chunks: &[&[u8]], limits: Limits, max_frame: Option<usize>) -> Vec<String> {
            let mut d = FrameDecoder::new(limits);
            if let Some(max) = max_frame {
                d.set_max_frame(max);
            }
            feed_all(d, chunks)
        }

        /// Whole, byte at a time and at `cuts`: all three must agree; returns the whole result.
        fn decode_every_way(
            input: &[u8],
            cuts: &[Index],
            limits: Limits,
            max_frame: Option<usize>,
        ) -> Vec<String> {
            let whole = decode(&[input], limits, max_frame);
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(decode(&bytes, limits, max_frame), whole, "byte at a time");
            assert_eq!(
                decode(&chunks(input, cuts), limits, max_frame),
                whole,
                "chunked at {:?}",
                cuts.iter()
                    .map(|i| i.index(input.len() + 1))
                    .collect::<Vec<_>>()
            );
            whole
        }

        /// A JSON value for `data`: strings with escapes and non-ASCII text, numbers, nesting.
        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                "[a-z\"\\\\\n\t\u{e9}\u{1F600}]{0,6}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 12, 3, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                    proptest::collection::btree_map("[a-z]{1,3}", inner, 0..3)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// An id as the peer writes it: none, a string or a number.
        fn frame_id() -> impl Strategy<Value = Option<Value>> {
            prop_oneof![
                Just(None),
                "[a-z0-9 \"\u{e9}]{0,8}".prop_map(|s| Some(Value::from(s))),
                any::<i32>().prop_map(|n| Some(Value::from(n))),
            ]
        }

        /// One valid frame line (without its terminator) and the summary it must decode to.
        fn valid_frame() -> impl Strategy<Value = (String, String)> {
            let kind = prop_oneof![
                (json_value(), proptest::collection::vec("[a-z]{1,4}", 0..=3)).prop_map(
                    |(data, tags)| {
                        let payload =
                            json!({"msg_type": "publish", "data": data, "context": {"tags": tags}});
                        let text = payload.to_string();
                        let envelope = format!(
                            "{},\"timestamp\":\"T\",\"source\":\"s\"}}",
                            &text[..text.len() - 1]
                        );
                        ("data", Some(payload), None, format!("data {envelope}"))
                    }
                ),
                Just(("ping", None, None, "ping".to_string())),
                Just(("pong", Some(json!("x")), None, "pong".to_string())),
                Just(("keepalive", None, None, "keepalive".to_string())),
                Just((
                    "close",
                    Some(json!({"reason": "done"})),
                    None,
                    "close".to_string()
                )),
                "[a-zA-Z0-9\u{e9}]{1,8}".prop_map(|t| (
                    "auth",
                    None,
                    Some(t.clone()),
                    format!("auth {t}")
                )),
            ];
            (kind, frame_id(), any::<u64>()).prop_map(|((kind, payload, token, want), id, ts)| {
                let mut frame = serde_json::Map::new();
                frame.insert("type".into(), kind.into());
                if let Some(p) = payload {
                    frame.insert("payload".into(), p);
                }
                if let Some(t) = token {
                    frame.insert("token".into(), t.into());
                }
                let id_text = id.map(|id| {
                    let text = id.to_string();
                    frame.insert("id".into(), id);
                    text
                });
                frame.insert("timestamp".into(), ts.into());
                (
                    Value::Object(frame).to_string(),
                    format!("{want} id={id_text:?}"),
                )
            })
        }

        /// How a line ends, and what may sit between lines.
        fn terminator() -> impl Strategy<Value = &'static str> {
            prop_oneof![
                4 => Just("\n"),
                2 => Just("\r\n"),
                1 => Just("\n\n"),
                1 => Just("\n  \t\r\n"),
            ]
        }

        /// A piece of a hostile stream: valid lines, broken JSON, non-objects, bad frames,
        /// lines over the limits, stray terminators and random bytes.
        fn hostile_piece() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                valid_frame().prop_map(|(line, _)| line.into_bytes()),
                Just(b"\n".to_vec()),
                Just(b"\r\n".to_vec()),
                Just(b"{".to_vec()),
                Just(b"}".to_vec()),
                Just(b"[1,{}]".to_vec()),
                Just(b"null".to_vec()),
                Just(br#"{"type":"nope","id":"q"}"#.to_vec()),
                Just(br#"{"type":5}"#.to_vec()),
                Just(br#"{"type":"ping","id":{}}"#.to_vec()),
                Just(br#"{"type":"data","id":3,"payload":"s"}"#.to_vec()),
                Just(br#"{"type":"data","payload":{"msg_type":"msg_check"}}"#.to_vec()),
                Just(
                    br#"{"type":"data","payload":{"msg_type":"publish","context":{"wait":true}}}"#
                        .to_vec()
                ),
                Just(br#"{"type":"ping"} {"type":"ping"}"#.to_vec()),
                Just(b"{\"type\":\"p\xffng\"}".to_vec()),
                (1usize..200).prop_map(|n| vec![b'x'; n]),
                (1usize..200).prop_map(|n| vec![b' '; n]),
                proptest::collection::vec(any::<u8>(), 0..24),
            ]
        }

        /// A frame limit for a hostile stream.
        #[derive(Debug, Clone)]
        enum Limit {
            Fixed(usize),
            /// The length of one of the stream's lines, plus -1, 0 or 1: the edges of the limit
            /// (a line exactly at it is accepted, one byte more is fatal, whole or partial).
            Line(Index, isize),
        }

        impl Limit {
            fn resolve(&self, input: &[u8]) -> usize {
                match self {
                    Self::Fixed(n) => *n,
                    Self::Line(i, delta) => {
                        let lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
                        lines[i.index(lines.len())]
                            .len()
                            .saturating_add_signed(*delta)
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// A valid stream decodes to exactly its frames, however it is cut.
            #[test]
            fn valid_streams_decode_the_same_however_they_are_cut(
                frames in proptest::collection::vec((valid_frame(), terminator()), 0..8),
                cuts in proptest::collection::vec(any::<Index>(), 0..12),
            ) {
                let mut input = Vec::new();
                let mut want = Vec::new();
                for ((line, summary), end) in &frames {
                    input.extend_from_slice(line.as_bytes());
                    input.extend_from_slice(end.as_bytes());
                    want.push(summary.clone());
                }
                prop_assert_eq!(decode_every_way(&input, &cuts, Limits::default(), None), want);
            }

            /// Any stream gives the same frames and errors, in the same order, up to and
            /// including the first fatal one (after which nothing is decoded), however it is
            /// cut; with a small frame limit too, so oversized lines and tails are reached.
            #[test]
            fn hostile_streams_give_the_same_errors_however_they_are_cut(
                pieces in proptest::collection::vec(hostile_piece(), 0..12),
                cuts in proptest::collection::vec(any::<Index>(), 0..12),
                max_frame in prop_oneof![
                    Just(None),
                    (0usize..160).prop_map(|n| Some(Limit::Fixed(n))),
                    (any::<Index>(), -1isize..=1).prop_map(|(i, d)| Some(Limit::Line(i, d))),
                ],
            ) {
                let input = pieces.concat();
                let max_frame = max_frame.map(|limit| limit.resolve(&input));
                let out = decode_every_way(&input, &cuts, LIMITS, max_frame);
                if let Some(i) = out.iter().position(|s| s.starts_with("fatal")) {
                    prop_assert_eq!(i + 1, out.len(), "nothing after a fatal error");
                }
            }
        }
    }

    /// The fuzz target's property on pseudo-random inputs built from frame fragments, so plain
    /// `cargo test` covers it too: splitting the input anywhere changes nothing.
    #[test]
    fn random_splits_decode_identically() {
        let pieces: &[&[u8]] = &[
            br#"{"type":"data","id":1,"payload":{"msg_type":"publish","data":[1,{"b":"c"}]}}"#,
            br#"{"type":"ping","id":"p"}"#,
            br#"{"type":"x"}"#,
            b"\n",
            b"\r\n",
            b" ",
            b"[1,{}]",
            b"{",
            br#"{"type":"auth","token":"t\u00e9"}"#,
            b"null",
        ];
        let limits = Limits {
            max_message_bytes: 64,
            max_tags: 10,
        };
        crate::testing::random_splits_agree(pieces, 8, b"", |reads| run(limits, reads));
    }
}
