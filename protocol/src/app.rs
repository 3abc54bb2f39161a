//! App socket messages (ARCHITECTURE §3, Tendrl-compatible): types, validation, error replies
//! and the incremental stream decoder. No I/O happens here: the sidecar feeds bytes in and
//! gets typed requests or error replies out, so the fuzz target exercises exactly this code.
//!
//! Framing is a stream of JSON values back to back (whitespace between them optional). A value
//! may be split across any number of reads; the decoder keeps the unconsumed tail and retries
//! once more bytes arrive.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, IgnoredAny, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Maximum number of tags in `context.tags` (seed 000, "Implementation Notes").
pub const DEFAULT_MAX_TAGS: usize = 10;
/// Largest accepted message, in bytes of JSON as written by the app.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// `msg_check` limit when the request names none.
pub const MSG_CHECK_DEFAULT_LIMIT: u32 = 1;
/// Largest `msg_check` limit; larger requests are clamped.
pub const MSG_CHECK_MAX_LIMIT: u32 = 100;
/// The exact reply to a `msg_check` that found nothing (the Tendrl SDK compares these bytes).
pub const NO_CONTENT_REPLY: &[u8] = b"204";

/// A string that borrows from the input when it has no escapes and owns it otherwise.
///
/// serde's own `Cow<str>` only borrows for a field marked `#[serde(borrow)]`, never inside
/// `Option` or `Vec`; this type borrows everywhere, which keeps ingest allocation-free for the
/// common message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowStr<'a>(pub Cow<'a, str>);

impl CowStr<'_> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for CowStr<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = CowStr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

impl Serialize for CowStr<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// `context.tags`, counted and checked to be strings without being collected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TagCount(pub usize);

impl<'de> Deserialize<'de> for TagCount {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TagCount;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of tag strings")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<TagCount, A::Error> {
                let mut n = 0;
                while seq.next_element::<CowStr<'de>>()?.is_some() {
                    n += 1;
                }
                Ok(TagCount(n))
            }
        }
        d.deserialize_seq(V)
    }
}

/// `context` of a message. Unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct Context<'a> {
    #[serde(default)]
    pub tags: Option<TagCount>,
    #[serde(default)]
    pub wait: Option<bool>,
    #[serde(borrow, default)]
    pub entity: Option<CowStr<'a>>,
    #[serde(default)]
    pub limit: Option<u32>,
}

/// `Some(value)` whenever the key is present, even when its value is `null`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: de::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

fn present_any<'de, D: de::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    IgnoredAny::deserialize(d).map(|_| true)
}

/// A message as the app wrote it, before validation. Only what the sidecar checks is
/// decoded; the message itself travels upstream as the app's own bytes (see
/// [`Publish::write_envelope`]), so unknown fields pass through untouched.
#[derive(Debug, Deserialize)]
pub struct RawMessage<'a> {
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub context: Option<Context<'a>>,
    #[serde(borrow, default)]
    pub msg_type: Option<CowStr<'a>>,
    #[serde(borrow, default)]
    pub dest: Option<CowStr<'a>>,
    /// `None`: absent; `Some(None)`: `null`.
    #[serde(borrow, default, deserialize_with = "present")]
    pub timestamp: Option<Option<CowStr<'a>>>,
    /// The app sent its own `source` (which the sidecar overrides).
    #[serde(default, deserialize_with = "present_any")]
    pub source: bool,
}

/// The message types the socket understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    Publish,
    MsgCheck,
}

impl MsgType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "publish" => Some(Self::Publish),
            "msg_check" => Some(Self::MsgCheck),
            _ => None,
        }
    }
}

/// A validated request.
#[derive(Debug)]
pub enum Request<'a> {
    /// `publish`; `wait` true means the platform's reply is relayed to the app.
    Publish(Publish<'a>),
    /// `msg_check` with the clamped limit.
    MsgCheck { limit: u32 },
}

/// A validated `publish`.
#[derive(Debug)]
pub struct Publish<'a> {
    pub message: RawMessage<'a>,
    pub wait: bool,
    /// The message's JSON text as received: one object, `{` … `}`.
    pub raw: &'a [u8],
}

impl Publish<'_> {
    /// Appends the upstream form of this message to `out`: the app's object with `timestamp`
    /// (`now`, RFC 3339) when it had none and `source` (`namespace/pod`, omitted when empty).
    ///
    /// The common case copies the app's bytes and appends the two fields before the closing
    /// brace, which keeps ingest close to parse speed; a message that carries its own
    /// `source` or a `null` timestamp is rebuilt as a map so no key appears twice.
    pub fn write_envelope(&self, out: &mut Vec<u8>, now: &str, source: &str) {
        let m = &self.message;
        if m.source || matches!(m.timestamp, Some(None)) {
            let mut map: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(self.raw).expect("validated message is a JSON object");
            if !matches!(m.timestamp, Some(Some(_))) {
                map.insert("timestamp".into(), now.into());
            }
            if source.is_empty() {
                map.remove("source");
            } else {
                map.insert("source".into(), source.into());
            }
            serde_json::to_writer(out, &map).expect("serialising into memory");
            return;
        }
        // `raw` ends with `}` and holds at least `msg_type`, so a comma always fits.
        out.extend_from_slice(&self.raw[..self.raw.len() - 1]);
        if m.timestamp.is_none() {
            out.extend_from_slice(br#","timestamp":"#);
            serde_json::to_writer(&mut *out, now).expect("serialising into memory");
        }
        if !source.is_empty() {
            out.extend_from_slice(br#","source":"#);
            serde_json::to_writer(&mut *out, source).expect("serialising into memory");
        }
        out.push(b'}');
    }

    /// The upstream form as a fresh buffer.
    pub fn to_envelope(&self, now: &str, source: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.raw.len() + 80);
        self.write_envelope(&mut out, now, source);
        out
    }
}

/// Limits applied while validating.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_tags: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_tags: DEFAULT_MAX_TAGS,
        }
    }
}

/// Everything the socket can answer with `{"status":"error","message":…}`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AppError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("invalid JSON: connection closed in the middle of a message")]
    Truncated,
    #[error("message too large: {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    #[error("missing msg_type")]
    MissingMsgType,
    #[error("unknown msg_type: {0}")]
    UnknownMsgType(String),
    #[error("too many tags provided; maximum is {max}")]
    TooManyTags { count: usize, max: usize },
    #[error("queue full, try again later")]
    QueueFull,
    #[error("upstream error: {0}")]
    Upstream(String),
    #[error("shutting down, try again later")]
    ShuttingDown,
}

impl AppError {
    /// Metric label (`rejected_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::Truncated => "truncated",
            Self::TooLarge { .. } => "too_large",
            Self::InvalidMessage(_) => "invalid_message",
            Self::MissingMsgType => "missing_msg_type",
            Self::UnknownMsgType(_) => "unknown_msg_type",
            Self::TooManyTags { .. } => "too_many_tags",
            Self::QueueFull => "queue_full",
            Self::Upstream(_) => "upstream",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// The reply bytes: `{"status":"error","message":"…"}`, no delimiter.
    pub fn reply(&self) -> Vec<u8> {
        error_reply(&self.to_string())
    }

    /// Appends the reply to `out`.
    pub fn write_reply(&self, out: &mut Vec<u8>) {
        write_error_reply(out, &self.to_string());
    }
}

#[derive(Serialize)]
struct ErrorReply<'a> {
    status: &'static str,
    message: &'a str,
}

/// `{"status":"error","message":<message>}`.
pub fn error_reply(message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + message.len());
    write_error_reply(&mut out, message);
    out
}

fn write_error_reply(out: &mut Vec<u8>, message: &str) {
    serde_json::to_writer(
        out,
        &ErrorReply {
            status: "error",
            message,
        },
    )
    .expect("serialising an error reply into memory");
}

/// Validates a parsed message; `raw` is its JSON text.
pub fn validate<'a>(
    message: RawMessage<'a>,
    raw: &'a [u8],
    limits: &Limits,
) -> Result<Request<'a>, AppError> {
    let Some(msg_type) = message.msg_type.as_ref() else {
        return Err(AppError::MissingMsgType);
    };
    let Some(kind) = MsgType::parse(msg_type.as_str()) else {
        let mut name: String = msg_type.as_str().chars().take(64).collect();
        if name.len() < msg_type.as_str().len() {
            name.push('…');
        }
        return Err(AppError::UnknownMsgType(name));
    };
    let count = message
        .context
        .as_ref()
        .and_then(|c| c.tags)
        .map_or(0, |t| t.0);
    if count > limits.max_tags {
        return Err(AppError::TooManyTags {
            count,
            max: limits.max_tags,
        });
    }
    match kind {
        MsgType::Publish => {
            let wait = message
                .context
                .as_ref()
                .and_then(|c| c.wait)
                .unwrap_or(false);
            Ok(Request::Publish(Publish { message, wait, raw }))
        }
        MsgType::MsgCheck => {
            let limit = message
                .context
                .as_ref()
                .and_then(|c| c.limit)
                .filter(|&l| l > 0)
                .unwrap_or(MSG_CHECK_DEFAULT_LIMIT)
                .min(MSG_CHECK_MAX_LIMIT);
            Ok(Request::MsgCheck { limit })
        }
    }
}

/// One step of [`StreamDecoder::next`].
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A complete, valid request.
    Request(Request<'a>),
    /// A complete value that is not a valid request: answer the error, keep the connection.
    Rejected(AppError),
    /// The stream cannot be resynchronised (invalid JSON, oversized partial value): answer the
    /// error, then close.
    Fatal(AppError),
    /// No complete value buffered; read more bytes.
    NeedMore,
}

/// Incremental decoder for a stream of JSON values.
///
/// Bytes go in through [`StreamDecoder::read_buf`] (or [`StreamDecoder::feed`]); complete
/// values come out of [`StreamDecoder::next`]. The buffer never holds more than one partial
/// value plus what one read brought in, and a partial value larger than the message limit is
/// fatal, so a client cannot make the sidecar buffer without bound.
#[derive(Debug)]
pub struct StreamDecoder {
    buf: Vec<u8>,
    pos: usize,
    limits: Limits,
    failed: bool,
}

impl StreamDecoder {
    pub fn new(limits: Limits) -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            limits,
            failed: false,
        }
    }

    /// Drops consumed bytes and returns the buffer for the next read, with at least
    /// `min_spare` bytes of spare capacity (reads append to it).
    pub fn read_buf(&mut self, min_spare: usize) -> &mut Vec<u8> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(min_spare);
        &mut self.buf
    }

    /// Appends bytes (tests and fuzzing).
    pub fn feed(&mut self, bytes: &[u8]) {
        self.read_buf(bytes.len()).extend_from_slice(bytes);
    }

    /// Bytes received but not consumed yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Call when the peer closed its side: an unfinished value is an error.
    pub fn finish(&mut self) -> Option<AppError> {
        let rest = &self.buf[self.pos..];
        if self.failed || rest.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            self.pos = self.buf.len();
            Some(AppError::Truncated)
        }
    }

    /// Decodes the next complete value, if any.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Decoded<'_> {
        if self.failed {
            return Decoded::NeedMore;
        }
        let limits = self.limits;
        // Disjoint field borrows: the returned request borrows `buf` while `pos` moves on.
        let buf: &[u8] = &self.buf;
        let pos = &mut self.pos;
        let failed = &mut self.failed;

        let ws = buf[*pos..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
        *pos += ws;
        let rest = &buf[*pos..];
        if rest.is_empty() {
            return Decoded::NeedMore;
        }

        if rest[0] != b'{' {
            // serde would read `[…]` as a struct in tuple form; a message is an object.
            return skip_value(rest, pos, failed, &limits, "expected a JSON object".into());
        }
        let mut stream = serde_json::Deserializer::from_slice(rest).into_iter::<RawMessage>();
        match stream.next() {
            Some(Ok(message)) => {
                let size = stream.byte_offset();
                *pos += size;
                if size > limits.max_message_bytes {
                    return Decoded::Rejected(AppError::TooLarge {
                        size,
                        max: limits.max_message_bytes,
                    });
                }
                match validate(message, &rest[..size], &limits) {
                    Ok(req) => Decoded::Request(req),
                    Err(e) => Decoded::Rejected(e),
                }
            }
            Some(Err(e)) if e.is_eof() => {
                if rest.len() > limits.max_message_bytes {
                    *failed = true;
                    Decoded::Fatal(AppError::TooLarge {
                        size: rest.len(),
                        max: limits.max_message_bytes,
                    })
                } else {
                    Decoded::NeedMore
                }
            }
            Some(Err(e)) if e.is_data() => {
                // Well-formed JSON of the wrong shape: find where the value ends so the
                // connection can go on with the next one.
                let text = e.to_string();
                skip_value(rest, pos, failed, &limits, strip_location(&text).to_owned())
            }
            Some(Err(e)) => {
                *failed = true;
                Decoded::Fatal(AppError::InvalidJson(e.to_string()))
            }
            None => Decoded::NeedMore,
        }
    }
}

/// Skips one complete JSON value that is not a valid message, rejecting it with `why`.
fn skip_value<'a>(
    rest: &[u8],
    pos: &mut usize,
    failed: &mut bool,
    limits: &Limits,
    why: String,
) -> Decoded<'a> {
    let mut skip = serde_json::Deserializer::from_slice(rest).into_iter::<IgnoredAny>();
    match skip.next() {
        Some(Ok(_)) => {
            let size = skip.byte_offset();
            if size == rest.len() && matches!(rest[0], b'-' | b'0'..=b'9') {
                // A number at the end of the buffer may continue in the next read.
                return Decoded::NeedMore;
            }
            *pos += size;
            if size > limits.max_message_bytes {
                return Decoded::Rejected(AppError::TooLarge {
                    size,
                    max: limits.max_message_bytes,
                });
            }
            Decoded::Rejected(AppError::InvalidMessage(why))
        }
        Some(Err(e)) if e.is_eof() => {
            if rest.len() > limits.max_message_bytes {
                *failed = true;
                Decoded::Fatal(AppError::TooLarge {
                    size: rest.len(),
                    max: limits.max_message_bytes,
                })
            } else {
                Decoded::NeedMore
            }
        }
        Some(Err(e)) => {
            *failed = true;
            Decoded::Fatal(AppError::InvalidJson(e.to_string()))
        }
        None => Decoded::NeedMore,
    }
}

/// serde_json appends " at line L column C"; positions inside one value mean little to the
/// app and make replies differ between identical messages.
fn strip_location(s: &str) -> &str {
    match s.rfind(" at line ") {
        Some(i) => &s[..i],
        None => s,
    }
}

/// Builds the reply to a `msg_check` from the platform's messages: `204` when there are none,
/// the JSON array otherwise.
pub fn msg_check_reply(messages: &[serde_json::Value]) -> Vec<u8> {
    if messages.is_empty() {
        NO_CONTENT_REPLY.to_vec()
    } else {
        serde_json::to_vec(messages).expect("serialising JSON values")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Vec<String> {
        let mut d = StreamDecoder::new(Limits::default());
        d.feed(input);
        let mut out = vec![];
        loop {
            match d.next() {
                Decoded::Request(Request::Publish(p)) => {
                    out.push(format!("publish wait={}", p.wait));
                }
                Decoded::Request(Request::MsgCheck { limit }) => {
                    out.push(format!("msg_check {limit}"))
                }
                Decoded::Rejected(e) => out.push(format!("rejected {e}")),
                Decoded::Fatal(e) => {
                    out.push(format!("fatal {}", e.reason()));
                    break;
                }
                Decoded::NeedMore => break,
            }
        }
        if let Some(e) = d.finish() {
            out.push(format!("finish {}", e.reason()));
        }
        out
    }

    #[test]
    fn back_to_back_values() {
        let got = decode_all(
            br#"{"msg_type":"publish","data":{"a":1}}{"msg_type":"msg_check","context":{"limit":500}}
            {"msg_type":"publish","context":{"wait":true}}"#,
        );
        assert_eq!(
            got,
            ["publish wait=false", "msg_check 100", "publish wait=true"]
        );
    }

    #[test]
    fn every_split_point_gives_the_same_result() {
        let input = br#"{"msg_type":"publish","data":{"s":"h\u00e9llo \"x\""},"context":{"tags":["a","b"]}} {"msg_type":"msg_check"}"#;
        for split in 0..input.len() {
            let mut d = StreamDecoder::new(Limits::default());
            let mut got = vec![];
            for part in [&input[..split], &input[split..]] {
                d.feed(part);
                loop {
                    match d.next() {
                        Decoded::Request(Request::Publish(p)) => {
                            got.push(String::from_utf8(p.to_envelope("T", "ns/p")).unwrap())
                        }
                        Decoded::Request(Request::MsgCheck { limit }) => {
                            got.push(limit.to_string())
                        }
                        Decoded::NeedMore => break,
                        other => panic!("split {split}: {other:?}"),
                    }
                }
            }
            assert_eq!(got.len(), 2, "split {split}");
            assert_eq!(
                got[0],
                r#"{"msg_type":"publish","data":{"s":"h\u00e9llo \"x\""},"context":{"tags":["a","b"]},"timestamp":"T","source":"ns/p"}"#
            );
            assert_eq!(got[1], "1");
        }
    }

    #[test]
    fn errors() {
        let eleven = r#"{"msg_type":"publish","context":{"tags":["1","2","3","4","5","6","7","8","9","10","11"]}}"#;
        let cases: &[(&[u8], &[&str])] = &[
            (b"{\"data\":1}", &["rejected missing msg_type"]),
            (
                b"{\"msg_type\":\"nope\"}",
                &["rejected unknown msg_type: nope"],
            ),
            (
                eleven.as_bytes(),
                &["rejected too many tags provided; maximum is 10"],
            ),
            (
                b"{\"msg_type\":5}",
                &["rejected invalid message: invalid type: integer `5`, expected a string"],
            ),
            (
                b"[1,2]{\"msg_type\":\"msg_check\"}",
                &[
                    "rejected invalid message: expected a JSON object",
                    "msg_check 1",
                ],
            ),
            (b"{nope", &["fatal invalid_json"]),
            (b"{\"msg_type\":\"publish\"", &["finish truncated"]),
            (b"{\"msg_type\":\"pub\xfflish\"}", &["fatal invalid_json"]),
            (b"\x00\x01\x02", &["fatal invalid_json"]),
            (b"   \n ", &[]),
        ];
        for (input, want) in cases {
            assert_eq!(
                decode_all(input),
                *want,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    /// The fuzz target's property on pseudo-random inputs built from message fragments, so
    /// plain `cargo test` covers it too: splitting the input anywhere changes nothing.
    #[test]
    fn random_splits_decode_identically() {
        let pieces: &[&[u8]] = &[
            br#"{"msg_type":"publish","data":{"a":[1,2,{"b":"c"}]}}"#,
            br#"{"msg_type":"msg_check","context":{"limit":3}}"#,
            br#"{"msg_type":"x"}"#,
            b" \n\t",
            b"123",
            b"[1,{}]",
            br#""str""#,
            br#"{"msg_type":"publish","context":{"tags":["\u00e9"],"wait":true}}"#,
            b"null",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let run = |chunks: &[&[u8]]| {
            let mut d = StreamDecoder::new(Limits::default());
            let mut out = vec![];
            for c in chunks {
                d.feed(c);
                loop {
                    match d.next() {
                        Decoded::NeedMore => break,
                        Decoded::Request(Request::Publish(p)) => {
                            out.push(String::from_utf8(p.to_envelope("t", "s")).unwrap())
                        }
                        Decoded::Request(Request::MsgCheck { limit }) => {
                            out.push(limit.to_string())
                        }
                        Decoded::Rejected(e) => out.push(e.to_string()),
                        Decoded::Fatal(e) => out.push(format!("fatal {}", e.reason())),
                    }
                }
            }
            out.extend(d.finish().map(|e| e.to_string()));
            out
        };
        for _ in 0..2000 {
            let mut input = Vec::new();
            for _ in 0..rnd(6) + 1 {
                input.extend_from_slice(pieces[rnd(pieces.len())]);
                if rnd(2) == 0 {
                    input.push(b' ');
                }
            }
            let whole = run(&[&input]);
            let (a, b) = (rnd(input.len() + 1), rnd(input.len() + 1));
            let (a, b) = (a.min(b), a.max(b));
            let split = run(&[&input[..a], &input[a..b], &input[b..]]);
            assert_eq!(
                whole,
                split,
                "input {:?} split at {a},{b}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[test]
    fn oversized_partial_value_is_fatal() {
        let mut d = StreamDecoder::new(Limits {
            max_message_bytes: 100,
            max_tags: 10,
        });
        d.feed(b"{\"msg_type\":\"publish\",\"data\":\"");
        assert!(matches!(d.next(), Decoded::NeedMore));
        d.feed(&[b'x'; 200]);
        assert!(matches!(
            d.next(),
            Decoded::Fatal(AppError::TooLarge { .. })
        ));
        let mut d = StreamDecoder::new(Limits {
            max_message_bytes: 40,
            max_tags: 10,
        });
        d.feed(b"{\"msg_type\":\"publish\",\"data\":\"xxxxxxxxxxxxxxxxxxxxxxxxx\"}{\"msg_type\":\"msg_check\"}");
        assert!(matches!(
            d.next(),
            Decoded::Rejected(AppError::TooLarge { .. })
        ));
        assert!(matches!(
            d.next(),
            Decoded::Request(Request::MsgCheck { limit: 1 })
        ));
    }

    #[test]
    fn replies() {
        assert_eq!(
            AppError::QueueFull.reply(),
            br#"{"status":"error","message":"queue full, try again later"}"#
        );
        assert_eq!(
            AppError::TooManyTags { count: 11, max: 10 }.reply(),
            br#"{"status":"error","message":"too many tags provided; maximum is 10"}"#
        );
        assert_eq!(msg_check_reply(&[]), b"204");
        assert_eq!(
            msg_check_reply(&[serde_json::json!({"a":1})]),
            br#"[{"a":1}]"#
        );
    }

    #[test]
    fn envelope_keeps_unknown_fields_and_never_duplicates_keys() {
        let env = |input: &[u8]| {
            let mut d = StreamDecoder::new(Limits::default());
            d.feed(input);
            let Decoded::Request(Request::Publish(p)) = d.next() else {
                panic!()
            };
            let out = p.to_envelope("2026-01-01T00:00:00.000Z", "ns/pod");
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()
        };
        assert_eq!(
            env(br#"{"msg_type":"publish","extra":[1],"data":{"k":"v"} }"#),
            serde_json::json!({"msg_type":"publish","extra":[1],"data":{"k":"v"},
                "timestamp":"2026-01-01T00:00:00.000Z","source":"ns/pod"})
        );
        let out = {
            let mut d = StreamDecoder::new(Limits::default());
            d.feed(br#"{"msg_type":"publish","source":"spoofed","timestamp":null}"#);
            let Decoded::Request(Request::Publish(p)) = d.next() else {
                panic!()
            };
            String::from_utf8(p.to_envelope("T", "ns/pod")).unwrap()
        };
        assert_eq!(out.matches("source").count(), 1, "{out}");
        assert_eq!(out.matches("timestamp").count(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["source"], "ns/pod");
        assert_eq!(v["timestamp"], "T");
    }

    #[test]
    fn timestamp_from_app_is_kept() {
        let mut d = StreamDecoder::new(Limits::default());
        d.feed(
            br#"{"msg_type":"publish","data":"s","dest":"e1","timestamp":"2020-01-01T00:00:00Z"}"#,
        );
        let Decoded::Request(Request::Publish(p)) = d.next() else {
            panic!()
        };
        assert_eq!(
            p.to_envelope("now", ""),
            br#"{"msg_type":"publish","data":"s","dest":"e1","timestamp":"2020-01-01T00:00:00Z"}"#
        );
    }
}
