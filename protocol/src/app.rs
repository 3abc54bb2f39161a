//! App socket messages (Tendrl-compatible; `docs/architecture.md`, "App socket"): types, validation, error replies
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

use crate::read_buffer::ReadBuffer;

/// Maximum number of tags in `context.tags` (the Tendrl SDK's limit).
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

/// `context` of a message. Unknown fields pass through (read as [`AnyValue`]).
#[derive(Debug, Default)]
pub struct Context<'a> {
    pub tags: Option<TagCount>,
    pub wait: Option<bool>,
    pub entity: Option<CowStr<'a>>,
    pub limit: Option<u32>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Context<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Context<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a context object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut c = Context::default();
                let [mut tags, mut wait, mut entity, mut limit] = [false; 4];
                while let Some(key) = map.next_key::<CowStr<'de>>()? {
                    match key.as_str() {
                        "tags" => {
                            first_time(&mut tags, "tags")?;
                            c.tags = map.next_value()?;
                        }
                        "wait" => {
                            first_time(&mut wait, "wait")?;
                            c.wait = map.next_value()?;
                        }
                        "entity" => {
                            first_time(&mut entity, "entity")?;
                            c.entity = map.next_value()?;
                        }
                        "limit" => {
                            first_time(&mut limit, "limit")?;
                            c.limit = map.next_value()?;
                        }
                        _ => {
                            map.next_value::<AnyValue>()?;
                        }
                    }
                }
                Ok(c)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Any JSON value, read the way a platform's parser reads it, then dropped. serde's
/// `IgnoredAny` and `RawValue` skip a number without converting it, so `1e400` would pass
/// here and be refused by the platform (serde_json and Go's encoding/json both refuse a
/// number beyond a 64-bit float); this converts every number, so the sidecar accepts
/// exactly what such a parser accepts.
pub(crate) struct AnyValue;

impl<'de> Deserialize<'de> for AnyValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AnyValue)
    }
}

impl<'de> Visitor<'de> for AnyValue {
    type Value = AnyValue;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_bool<E>(self, _: bool) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_i64<E>(self, _: i64) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_u64<E>(self, _: u64) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_f64<E>(self, _: f64) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_str<E>(self, _: &str) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<AnyValue, A::Error> {
        while seq.next_element::<AnyValue>()?.is_some() {}
        Ok(AnyValue)
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<AnyValue, A::Error> {
        while map.next_entry::<AnyValue, AnyValue>()?.is_some() {}
        Ok(AnyValue)
    }
}

/// A message as the app wrote it, before validation. Only what the sidecar checks is
/// decoded; the message itself travels upstream as the app's own bytes (see
/// [`Publish::write_envelope`]), so unknown fields pass through untouched.
///
/// Every value is read the way a platform's parser would read it (values the sidecar does not
/// need as [`AnyValue`]), and [`accept`] checks the UTF-8 of the whole text once. So whatever
/// this parse accepts, the envelope can copy and the platform can parse: stamping never
/// parses again.
#[derive(Debug, Default)]
pub struct RawMessage<'a> {
    pub context: Option<Context<'a>>,
    pub msg_type: Option<CowStr<'a>>,
    pub dest: Option<CowStr<'a>>,
    /// `None`: absent; `Some(None)`: `null`.
    pub timestamp: Option<Option<CowStr<'a>>>,
    /// The app sent its own `source` (which the sidecar overrides).
    pub source: bool,
}

/// Where an entry of the message object lies, as addresses in the parsed input: from the end
/// of the previous value (`None`: the object's opening brace) to the end of its own value.
/// Its key and separators lie in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    after: Option<usize>,
    end: usize,
}

/// Marks a field as seen; a repeated key is refused like serde's derive does.
fn first_time<E: de::Error>(seen: &mut bool, name: &'static str) -> Result<(), E> {
    if std::mem::replace(seen, true) {
        return Err(E::duplicate_field(name));
    }
    Ok(())
}

impl<'de: 'a, 'a> Deserialize<'de> for RawMessage<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RawMessage<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut m = RawMessage::default();
                let [
                    mut msg_type,
                    mut context,
                    mut data,
                    mut dest,
                    mut timestamp,
                    mut source,
                ] = [false; 6];
                while let Some(key) = map.next_key::<CowStr<'de>>()? {
                    match key.as_str() {
                        "msg_type" => {
                            first_time(&mut msg_type, "msg_type")?;
                            m.msg_type = map.next_value()?;
                        }
                        "context" => {
                            first_time(&mut context, "context")?;
                            m.context = map.next_value()?;
                        }
                        "data" => {
                            first_time(&mut data, "data")?;
                            map.next_value::<AnyValue>()?;
                        }
                        "dest" => {
                            first_time(&mut dest, "dest")?;
                            m.dest = map.next_value()?;
                        }
                        "timestamp" => {
                            first_time(&mut timestamp, "timestamp")?;
                            m.timestamp = Some(map.next_value()?);
                        }
                        "source" => {
                            first_time(&mut source, "source")?;
                            m.source = true;
                            map.next_value::<AnyValue>()?;
                        }
                        // Skipped without a UTF-8 check: `accept` checks the whole message.
                        _ => {
                            map.next_value::<AnyValue>()?;
                        }
                    }
                }
                Ok(m)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Where the entries the envelope leaves out lie in a message that has them (an app `source`,
/// a `null` timestamp): a second look at a message the first parse accepted, taking every
/// value as raw text, which accepts whatever the typed first parse did. Runs before the
/// message is accepted, so a message whose entries cannot be found is refused, never written
/// wrong.
fn dropped_entries(raw: &[u8]) -> Result<[Option<Entry>; 2], serde_json::Error> {
    struct Entries([Option<Entry>; 2]);
    impl<'de> Deserialize<'de> for Entries {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Entries;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a message object")
                }
                fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                    let mut found = [None; 2];
                    let mut slots = found.iter_mut();
                    let mut after = None;
                    while let Some(key) = map.next_key::<CowStr<'de>>()? {
                        let value: &'de RawValue = map.next_value()?;
                        let text = value.get();
                        let end = text.as_ptr() as usize + text.len();
                        let drop = match key.as_str() {
                            "source" => true,
                            "timestamp" => text == "null",
                            _ => false,
                        };
                        if drop && let Some(slot) = slots.next() {
                            *slot = Some(Entry { after, end });
                        }
                        after = Some(end);
                    }
                    Ok(Entries(found))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Entries>(raw).map(|e| e.0)
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

/// A validated `publish`: what the envelope needs, nothing more (it is returned once per
/// message, so it stays small).
#[derive(Debug)]
pub struct Publish<'a> {
    pub wait: bool,
    /// The message's JSON text as received: one object, `{` … `}`.
    pub raw: &'a [u8],
    /// The app gave its own timestamp (a string), which the envelope keeps.
    pub has_timestamp: bool,
    /// Byte ranges of `raw` the envelope leaves out, in order: the app's `source` and a `null`
    /// timestamp, each from the end of the previous value to the end of its own.
    cuts: [Option<(u32, u32)>; 2],
}

impl Publish<'_> {
    /// Appends the upstream form of this message to `out`: the app's object with `timestamp`
    /// (`now`, RFC 3339) when it had none and `source` (`namespace/pod`, omitted when empty).
    ///
    /// The app's bytes are copied as they are, less the entries the parse marked (its own
    /// `source`, a `null` timestamp) so no key appears twice; nothing is parsed again, so
    /// whatever was accepted can be written.
    pub fn write_envelope(&self, out: &mut Vec<u8>, now: &str, source: &str) {
        self.write_stamped(out, &Stamp::new(now, source));
    }

    /// [`Publish::write_envelope`] with the added entries encoded once for many messages.
    pub fn write_stamped(&self, out: &mut Vec<u8>, stamp: &Stamp) {
        let raw = self.raw;
        out.push(b'{');
        let mut empty = true;
        let mut from = 1;
        let mut copy = |out: &mut Vec<u8>, piece: &[u8]| {
            let piece = if empty {
                // Leaving out the first entry leaves its successor's comma in front.
                let piece = trim_json_ws(piece);
                piece.strip_prefix(b",").map_or(piece, trim_json_ws)
            } else {
                piece
            };
            empty &= piece.is_empty();
            out.extend_from_slice(piece);
        };
        for (start, end) in self.cuts.into_iter().flatten() {
            let (start, end) = (start as usize, end as usize);
            copy(out, raw.get(from..start).unwrap_or_default());
            from = end;
        }
        copy(
            out,
            raw.get(from..raw.len().saturating_sub(1))
                .unwrap_or_default(),
        );
        if !self.has_timestamp {
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(&stamp.timestamp);
            empty = false;
        }
        if !stamp.source.is_empty() {
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(&stamp.source);
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

/// The entries stamping adds to a message (`"timestamp":…` and `"source":…`, the latter
/// empty when there is no source), JSON-encoded once for every message of a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    timestamp: Vec<u8>,
    source: Vec<u8>,
}

impl Stamp {
    /// `now`: RFC 3339; `source`: `namespace/pod`, empty for none.
    pub fn new(now: &str, source: &str) -> Self {
        let mut timestamp = br#""timestamp":"#.to_vec();
        push_json_str(&mut timestamp, now);
        let mut entry = Vec::new();
        if !source.is_empty() {
            entry.extend_from_slice(br#""source":"#);
            push_json_str(&mut entry, source);
        }
        Self {
            timestamp,
            source: entry,
        }
    }
}

/// Appends `s` as a JSON string. Serialising a `str` into a `Vec` cannot fail (serde_json
/// fails only on I/O errors and non-string map keys), so there is no error to pass on.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    let _infallible = serde_json::to_writer(out, s);
}

/// JSON's whitespace (RFC 8259 §2); `u8::is_ascii_whitespace` also takes form feed, which
/// JSON does not.
fn is_json_ws(b: &u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn trim_json_ws(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s
        && is_json_ws(first)
    {
        s = rest;
    }
    while let [rest @ .., last] = s
        && is_json_ws(last)
    {
        s = rest;
    }
    s
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
    /// A message began but did not end within the idle timeout (a stalled or trickling
    /// client): the connection closes so it cannot hold a slot forever.
    #[error("message not completed within {}s; send each message whole", .0.as_secs_f64())]
    Incomplete(std::time::Duration),
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
            Self::Incomplete(_) => "incomplete",
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
    // Serialising strings into memory cannot fail (see `push_json_str`).
    let _infallible = serde_json::to_writer(
        out,
        &ErrorReply {
            status: "error",
            message,
        },
    );
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
            Ok(Request::Publish(Publish {
                wait,
                raw,
                has_timestamp: matches!(message.timestamp, Some(Some(_))),
                cuts: [None; 2],
            }))
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

/// Deepest nesting a message may have; the top-level object is level 1. serde_json refuses
/// to parse past 128 levels, so a platform built on it would refuse a deeper message, and the
/// sidecar says so at once instead.
pub const MAX_DEPTH: u32 = 100;

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
/// values come out of [`StreamDecoder::next`]. A [`Framer`] finds where each value ends,
/// looking at every byte once however the stream was split into reads, and only a complete
/// value is parsed (once). So where a read ends — inside a number, a string, an escape —
/// cannot change what is decoded, and decoding costs time linear in the bytes received. The
/// buffer never holds more than one partial value plus what one read brought in, and a
/// partial value larger than the message limit is fatal, so a client cannot make the sidecar
/// buffer without bound.
#[derive(Debug)]
pub struct StreamDecoder {
    /// What reads brought in; its consumed position is the start of the first value not
    /// consumed yet.
    pub input: ReadBuffer,
    framer: Framer,
    /// Values decoded so far (see [`StreamDecoder::values_begun`]).
    begun: u64,
    limits: Limits,
    failed: bool,
}

impl StreamDecoder {
    pub fn new(limits: Limits) -> Self {
        Self {
            input: ReadBuffer::default(),
            framer: Framer::default(),
            begun: 0,
            limits,
            failed: false,
        }
    }

    /// A value has begun and not ended yet (its first byte has been decoded).
    pub fn in_value(&self) -> bool {
        !self.failed && self.framer.kind != Kind::Start
    }

    /// How many values have begun so far: with [`StreamDecoder::in_value`], tells a caller
    /// timing each message whether the partial value is still the one it started timing.
    pub fn values_begun(&self) -> u64 {
        self.begun + u64::from(self.in_value())
    }

    /// Call when the peer closed its side: an unfinished value is an error. A number or
    /// literal that ends the stream ends there, as it would for a parser given the whole
    /// stream at once.
    pub fn finish(&mut self) -> Option<AppError> {
        let rest = self.input.buf.get(self.input.pos..).unwrap_or_default();
        self.input.pos = self.input.buf.len();
        if self.failed || rest.iter().all(is_json_ws) {
            return None;
        }
        let framer = std::mem::take(&mut self.framer);
        if framer.kind != Kind::Scalar {
            return Some(AppError::Truncated);
        }
        match decode_value(rest, &framer, &self.limits) {
            Decoded::Rejected(e) | Decoded::Fatal(e) => Some(e),
            Decoded::Request(_) | Decoded::NeedMore => None,
        }
    }

    /// Decodes the next complete value, if any.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Decoded<'_> {
        if self.failed {
            return Decoded::NeedMore;
        }
        if self.framer.kind == Kind::Start {
            let ws = self
                .input
                .rest()
                .iter()
                .take_while(|b| is_json_ws(b))
                .count();
            self.input.pos += ws;
        }
        let rest = self.input.buf.get(self.input.pos..).unwrap_or_default();
        if rest.is_empty() {
            return Decoded::NeedMore;
        }
        if self.framer.kind == Kind::Start
            && let Some((size, decoded)) = decode_whole(rest, &self.limits)
        {
            self.begun += 1;
            self.input.pos += size;
            return decoded;
        }
        match self.framer.scan(rest) {
            Scan::Partial if rest.len() > self.limits.max_message_bytes => {
                self.failed = true;
                Decoded::Fatal(AppError::TooLarge {
                    size: rest.len(),
                    max: self.limits.max_message_bytes,
                })
            }
            Scan::Partial => Decoded::NeedMore,
            Scan::Invalid(n) => {
                self.failed = true;
                Decoded::Fatal(AppError::InvalidJson(invalid_json(rest.get(..n))))
            }
            Scan::Complete(size) => {
                let framer = std::mem::take(&mut self.framer);
                self.begun += 1;
                self.input.pos += size;
                let value = rest.get(..size).unwrap_or_default();
                let decoded = decode_value(value, &framer, &self.limits);
                if matches!(decoded, Decoded::Fatal(_)) {
                    self.failed = true;
                }
                decoded
            }
        }
    }
}

crate::testing::impl_decoder!(StreamDecoder, Decoded, {
    fn end_of_stream(&mut self) -> Option<Decoded<'_>> {
        self.finish().map(Decoded::Fatal)
    }

    /// One partial value within the limit plus what one read brought in.
    fn check_buffer(&self, read_len: usize) {
        assert!(self.input.buffered() <= self.limits.max_message_bytes + read_len + 1);
    }
});

/// serde_json's own words for the bytes up to the first one that cannot be JSON.
fn invalid_json(prefix: Option<&[u8]>) -> String {
    match serde_json::from_slice::<IgnoredAny>(prefix.unwrap_or_default()) {
        Err(e) if !e.is_eof() => e.to_string(),
        _ => "unexpected byte".to_owned(),
    }
}

/// Decodes one complete value that the framer delimited.
fn decode_value<'a>(value: &'a [u8], framer: &Framer, limits: &Limits) -> Decoded<'a> {
    if value.len() > limits.max_message_bytes {
        return Decoded::Rejected(AppError::TooLarge {
            size: value.len(),
            max: limits.max_message_bytes,
        });
    }
    // Both checked before parsing: serde_json would call them invalid JSON (its recursion
    // limit, or a lone surrogate in a field it decodes), which would close the connection
    // for a value the framer knows the end of.
    if let Some(refused) = refuse_shape(framer) {
        return Decoded::Rejected(refused);
    }
    if value.first() != Some(&b'{') {
        // serde would read `[…]` as a struct in tuple form; a message is an object.
        return match serde_json::from_slice::<IgnoredAny>(value) {
            Ok(_) => Decoded::Rejected(AppError::InvalidMessage("expected a JSON object".into())),
            Err(e) => Decoded::Fatal(AppError::InvalidJson(e.to_string())),
        };
    }
    match serde_json::from_slice::<RawMessage>(value) {
        Ok(message) => accept(message, value, limits),
        // Well-formed JSON of the wrong shape: the framer knows where it ends, so the
        // connection goes on with the next value.
        Err(e) if e.is_data() => Decoded::Rejected(AppError::InvalidMessage(
            strip_location(&e.to_string()).to_owned(),
        )),
        // Well-formed (the parse that skips values accepts it) yet refused by the one that
        // reads them: a number beyond a 64-bit float, since depth and lone surrogates were
        // refused above. The framer knows where the value ends: the connection goes on.
        Err(e) if serde_json::from_slice::<IgnoredAny>(value).is_ok() => {
            Decoded::Rejected(not_utf8(value).unwrap_or_else(|| {
                AppError::InvalidMessage(format!(
                    "a number is beyond the range of a 64-bit float (about ±1.8e308), which \
                     JSON parsers refuse; send it as a string ({e})"
                ))
            }))
        }
        Err(e) => Decoded::Fatal(AppError::InvalidJson(e.to_string())),
    }
}

/// What the framer saw that a JSON parser would refuse later, although the syntax allows it.
fn refuse_shape(framer: &Framer) -> Option<AppError> {
    if framer.deepest > MAX_DEPTH {
        return Some(AppError::InvalidMessage(format!(
            "nested deeper than {MAX_DEPTH} levels"
        )));
    }
    framer.lone_surrogate.then(|| {
        AppError::InvalidMessage(
            "a string holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), which JSON \
             parsers refuse; send valid Unicode"
                .into(),
        )
    })
}

/// The common case, in one parse: a message object that arrived whole. serde_json finds its
/// end while parsing it; the framer is run over it only when a cheap look says it could
/// matter (a `\u` escape, or more brackets than [`MAX_DEPTH`]). `None` when the buffer does
/// not start with a whole message object: the framer takes over.
fn decode_whole<'a>(rest: &'a [u8], limits: &Limits) -> Option<(usize, Decoded<'a>)> {
    if rest.first() != Some(&b'{') {
        return None;
    }
    let mut stream = serde_json::Deserializer::from_slice(rest).into_iter::<RawMessage>();
    let message = stream.next()?.ok()?;
    let size = stream.byte_offset();
    let value = rest.get(..size)?;
    if size > limits.max_message_bytes {
        let max = limits.max_message_bytes;
        return Some((size, Decoded::Rejected(AppError::TooLarge { size, max })));
    }
    // One pass over the bytes that could matter: opening brackets and backslashes.
    let (mut brackets, mut unicode_escape) = (0, false);
    for i in memchr::memchr3_iter(b'{', b'[', b'\\', value) {
        if value.get(i) == Some(&b'\\') {
            unicode_escape |= value.get(i + 1) == Some(&b'u');
        } else {
            brackets += 1;
        }
    }
    if brackets > MAX_DEPTH || unicode_escape {
        let mut framer = Framer::default();
        if framer.scan(value) != Scan::Complete(size) {
            return None;
        }
        if let Some(refused) = refuse_shape(&framer) {
            return Some((size, Decoded::Rejected(refused)));
        }
    }
    Some((size, accept(message, value, limits)))
}

/// Accepts a parsed message object: validates it, then finds the entries its envelope leaves
/// out (before it is accepted, so a message whose entries cannot be found is refused, never
/// written wrong).
fn accept<'a>(message: RawMessage<'a>, value: &'a [u8], limits: &Limits) -> Decoded<'a> {
    // The envelope copies the message's bytes: one UTF-8 check over all of them, whatever
    // the parse looked at.
    if let Some(refused) = not_utf8(value) {
        return Decoded::Rejected(refused);
    }
    let rebuild = message.source || matches!(message.timestamp, Some(None));
    let mut request = match validate(message, value, limits) {
        Ok(req) => req,
        Err(e) => return Decoded::Rejected(e),
    };
    if rebuild && let Request::Publish(p) = &mut request {
        match cuts(value) {
            Some(cuts) => p.cuts = cuts,
            None => {
                return Decoded::Rejected(AppError::InvalidMessage(
                    "cannot locate the message's source or timestamp".into(),
                ));
            }
        }
    }
    Decoded::Request(request)
}

/// Refuses a value that is not UTF-8, saying where.
fn not_utf8(value: &[u8]) -> Option<AppError> {
    let e = std::str::from_utf8(value).err()?;
    Some(AppError::InvalidMessage(format!(
        "not valid UTF-8 at byte {}; JSON text is UTF-8",
        e.valid_up_to()
    )))
}

/// The byte ranges of `value` its envelope leaves out (see [`Publish::cuts`]).
fn cuts(value: &[u8]) -> Option<[Option<(u32, u32)>; 2]> {
    let base = value.as_ptr() as usize;
    let offset = |addr: usize| u32::try_from(addr.checked_sub(base)?).ok();
    let mut cuts = [None; 2];
    for (slot, entry) in cuts.iter_mut().zip(dropped_entries(value).ok()?) {
        if let Some(Entry { after, end }) = entry {
            *slot = Some((after.map_or(Some(1), offset)?, offset(end)?));
        }
    }
    cuts.sort_unstable();
    Some(cuts)
}

/// Parses and validates one complete message given on its own (the TCP listener's `data`
/// payload), with exactly the checks of the socket's stream.
pub fn parse_message<'a>(payload: &'a [u8], limits: &Limits) -> Result<Request<'a>, AppError> {
    let payload = trim_json_ws(payload);
    let mut framer = Framer::default();
    match framer.scan(payload) {
        Scan::Complete(size) if size == payload.len() => {}
        Scan::Invalid(n) => return Err(AppError::InvalidJson(invalid_json(payload.get(..n)))),
        _ => {
            return Err(AppError::InvalidMessage("expected one JSON object".into()));
        }
    }
    match decode_value(payload, &framer, limits) {
        Decoded::Request(req) => Ok(req),
        Decoded::Rejected(e) | Decoded::Fatal(e) => Err(e),
        Decoded::NeedMore => Err(AppError::Truncated),
    }
}

/// What kind of value the framer is in.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Between values.
    #[default]
    Start,
    /// An object or array: ends at the bracket that closes the first one.
    Container,
    /// A top-level string: ends at its closing quote.
    Str,
    /// A number or literal: ends before the first byte that cannot continue it.
    Scalar,
}

/// Where the framer is inside a string.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum InString {
    #[default]
    No,
    Yes,
    /// After a backslash.
    Escape,
    /// Inside `\uXXXX`: hex digits read so far and their value.
    Hex {
        digits: u8,
        value: u16,
    },
}

/// The framer's answer for the bytes of one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// The value is the first `n` bytes.
    Complete(usize),
    /// The value goes on past the bytes given.
    Partial,
    /// The first `n` bytes are already not JSON (a byte no JSON text has at that place).
    Invalid(usize),
}

/// Finds where a JSON value ends, resuming where the previous call stopped, so every byte is
/// looked at once however the value arrives. It follows only the structure — brackets,
/// strings, escapes — and leaves the syntax to the parse of the complete value. On the way
/// it notes what a JSON parser would refuse later although the syntax allows it: nesting
/// deeper than [`MAX_DEPTH`] and unpaired UTF-16 surrogate escapes.
#[derive(Debug, Default, Clone)]
struct Framer {
    /// Bytes of the current value looked at so far.
    scanned: usize,
    kind: Kind,
    depth: u32,
    deepest: u32,
    string: InString,
    /// The last escape was a high surrogate: a low one must follow at once.
    want_low: bool,
    lone_surrogate: bool,
}

impl Framer {
    fn scan(&mut self, value: &[u8]) -> Scan {
        if self.kind == Kind::Start {
            let Some(&first) = value.first() else {
                return Scan::Partial;
            };
            self.kind = match first {
                b'{' | b'[' => {
                    self.depth = 1;
                    self.deepest = 1;
                    Kind::Container
                }
                b'"' => {
                    self.string = InString::Yes;
                    Kind::Str
                }
                b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => Kind::Scalar,
                _ => return Scan::Invalid(1),
            };
            self.scanned = 1;
        }
        if self.kind == Kind::Scalar {
            let rest = value.get(self.scanned..).unwrap_or_default();
            return match rest
                .iter()
                .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')))
            {
                Some(n) => Scan::Complete(self.scanned + n),
                None => {
                    self.scanned = value.len();
                    Scan::Partial
                }
            };
        }
        let mut i = self.scanned;
        while let Some(&b) = value.get(i) {
            i += 1;
            match self.string {
                InString::No => match b {
                    b'"' => self.string = InString::Yes,
                    b'{' | b'[' => {
                        self.depth += 1;
                        self.deepest = self.deepest.max(self.depth);
                    }
                    b'}' | b']' => {
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 0 {
                            return Scan::Complete(i);
                        }
                    }
                    // Whitespace, separators, numbers and the letters of true/false/null:
                    // anything else is not JSON, and the stream ends here rather than when the
                    // value would have.
                    b' '
                    | b'\t'
                    | b'\n'
                    | b'\r'
                    | b','
                    | b':'
                    | b'0'..=b'9'
                    | b'-'
                    | b'+'
                    | b'.' => {}
                    b'a' | b'e' | b'f' | b'l' | b'n' | b'r' | b's' | b't' | b'u' | b'E' => {}
                    _ => return Scan::Invalid(i),
                },
                InString::Yes => {
                    if self.want_low && b != b'\\' {
                        self.lone_surrogate = true;
                        self.want_low = false;
                    }
                    match b {
                        b'"' => {
                            self.string = InString::No;
                            if self.kind == Kind::Str {
                                return Scan::Complete(i);
                            }
                        }
                        b'\\' => self.string = InString::Escape,
                        // JSON strings hold no raw control characters.
                        0..=0x1f => return Scan::Invalid(i),
                        // Plain text: skip to the next byte that matters.
                        _ => {
                            let rest = value.get(i..).unwrap_or_default();
                            i += memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
                        }
                    }
                }
                InString::Escape => {
                    if b == b'u' {
                        self.string = InString::Hex {
                            digits: 0,
                            value: 0,
                        };
                    } else {
                        if self.want_low {
                            self.lone_surrogate = true;
                            self.want_low = false;
                        }
                        self.string = InString::Yes;
                    }
                }
                InString::Hex { digits, value } => match char::from(b).to_digit(16) {
                    Some(d) => {
                        // At most 4 digits: the value fits in 16 bits.
                        let value = (value << 4) | d as u16;
                        if digits == 3 {
                            self.string = InString::Yes;
                            self.escape(value);
                        } else {
                            self.string = InString::Hex {
                                digits: digits + 1,
                                value,
                            };
                        }
                    }
                    None => {
                        // Not an escape JSON allows (the parse will say so): look at this
                        // byte again as string text.
                        self.string = InString::Yes;
                        i -= 1;
                    }
                },
            }
        }
        self.scanned = i;
        Scan::Partial
    }

    /// Pairs UTF-16 surrogate escapes: a high one (D800–DBFF) must be followed by a low one
    /// (DC00–DFFF), and a low one must follow a high one.
    fn escape(&mut self, unit: u16) {
        let high = (0xD800..=0xDBFF).contains(&unit);
        let low = (0xDC00..=0xDFFF).contains(&unit);
        if (self.want_low && !low) || (!self.want_low && low) {
            self.lone_surrogate = true;
        }
        self.want_low = high;
    }
}

/// serde_json appends " at line L column C"; positions inside one value mean little to the
/// app and make replies differ between identical messages.
fn strip_location(s: &str) -> &str {
    match s.rfind(" at line ") {
        Some(i) => s.get(..i).unwrap_or(s),
        None => s,
    }
}

/// Builds the reply to a `msg_check` from the platform's messages: `204` when there are none,
/// the JSON array otherwise.
pub fn msg_check_reply(messages: &[serde_json::Value]) -> Vec<u8> {
    if messages.is_empty() {
        NO_CONTENT_REPLY.to_vec()
    } else {
        // JSON values always serialise; an empty answer is the safe fallback all the same.
        serde_json::to_vec(messages).unwrap_or_else(|_| NO_CONTENT_REPLY.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Vec<String> {
        let mut d = StreamDecoder::new(Limits::default());
        d.input.feed(input);
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
                d.input.feed(part);
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
            (
                b"{\"msg_type\":\"pub\xfflish\"}{\"msg_type\":\"msg_check\"}",
                &[
                    "rejected invalid message: not valid UTF-8 at byte 16; JSON text is UTF-8",
                    "msg_check 1",
                ],
            ),
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

    /// JSON's grammar allows any number, but the parsers platforms use (serde_json, Go's
    /// encoding/json) refuse one beyond a 64-bit float's range. Such a message is refused
    /// wherever the number is (data, an unknown field, `context`, `source`), the connection
    /// goes on, and every message that is accepted parses as a `serde_json::Value`.
    #[test]
    fn numbers_beyond_a_float_are_refused_wherever_they_are() {
        let long_integer = format!("{{\"msg_type\":\"publish\",\"data\":{}}}", "9".repeat(400));
        let cases = [
            r#"{"msg_type":"publish","data":1e400}"#.to_owned(),
            r#"{"msg_type":"publish","data":[{"x":-2E+309}]}"#.to_owned(),
            r#"{"msg_type":"publish","extra":{"y":1e999}}"#.to_owned(),
            r#"{"msg_type":"publish","context":{"wait":false,"other":[1e400]}}"#.to_owned(),
            r#"{"msg_type":"publish","source":1e400}"#.to_owned(),
            long_integer,
        ];
        for case in &cases {
            let input = format!("{case} {{\"msg_type\":\"msg_check\"}}");
            let got = decode_all(input.as_bytes());
            assert_eq!(got.len(), 2, "{case}: {got:?}");
            assert!(
                got[0].starts_with("rejected invalid message: a number is beyond"),
                "{case}: {got:?}"
            );
            assert_eq!(got[1], "msg_check 1", "{case}");
            let tcp = parse_message(case.as_bytes(), &Limits::default());
            assert!(
                matches!(tcp, Err(AppError::InvalidMessage(_))),
                "{case}: {tcp:?}"
            );
        }
        // In range, however written: accepted.
        for ok in [
            "1e308",
            "-1.7976931348623157e308",
            "1e-400",
            "0e99999",
            "123456789012345678901234567890",
        ] {
            let input = format!("{{\"msg_type\":\"publish\",\"data\":{ok}}}");
            assert_eq!(decode_all(input.as_bytes()), ["publish wait=false"], "{ok}");
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
        let run = |chunks: &[&[u8]]| {
            let mut d = StreamDecoder::new(Limits::default());
            crate::testing::decode_reads(&mut d, chunks, |step| match step {
                Decoded::Request(Request::Publish(p)) => {
                    String::from_utf8(p.to_envelope("t", "s")).unwrap()
                }
                Decoded::Request(Request::MsgCheck { limit }) => limit.to_string(),
                Decoded::Rejected(e) => e.to_string(),
                Decoded::Fatal(e) => format!("fatal {}", e.reason()),
                Decoded::NeedMore => unreachable!("the driver stops at NeedMore"),
            })
        };
        crate::testing::random_splits_agree(pieces, 6, b" ", run);
    }

    #[test]
    fn oversized_partial_value_is_fatal() {
        let mut d = StreamDecoder::new(Limits {
            max_message_bytes: 100,
            max_tags: 10,
        });
        d.input.feed(b"{\"msg_type\":\"publish\",\"data\":\"");
        assert!(matches!(d.next(), Decoded::NeedMore));
        d.input.feed(&[b'x'; 200]);
        assert!(matches!(
            d.next(),
            Decoded::Fatal(AppError::TooLarge { .. })
        ));
        let mut d = StreamDecoder::new(Limits {
            max_message_bytes: 40,
            max_tags: 10,
        });
        d.input.feed(b"{\"msg_type\":\"publish\",\"data\":\"xxxxxxxxxxxxxxxxxxxxxxxxx\"}{\"msg_type\":\"msg_check\"}");
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
            d.input.feed(input);
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
            d.input
                .feed(br#"{"msg_type":"publish","source":"spoofed","timestamp":null}"#);
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

    /// The stamp encoded once gives the envelope `write_envelope` gives, escapes included.
    #[test]
    fn stamp_encoded_once_matches_the_envelope() {
        let mut d = StreamDecoder::new(Limits::default());
        d.input
            .feed(br#"{"msg_type":"publish","source":"x","data":1}{"msg_type":"publish"}"#);
        let (now, source) = ("2026-12-04T00:00:00.000Z", "ns/\"pod\"\\");
        let stamp = Stamp::new(now, source);
        for _ in 0..2 {
            let Decoded::Request(Request::Publish(p)) = d.next() else {
                panic!()
            };
            let mut stamped = Vec::new();
            p.write_stamped(&mut stamped, &stamp);
            assert_eq!(stamped, p.to_envelope(now, source));
            let v: serde_json::Value = serde_json::from_slice(&stamped).unwrap();
            assert_eq!(v["source"], source);
            assert_eq!(v["timestamp"], now);
        }
        let mut no_source = Vec::new();
        let mut d = StreamDecoder::new(Limits::default());
        d.input.feed(br#"{"msg_type":"publish"}"#);
        let Decoded::Request(Request::Publish(p)) = d.next() else {
            panic!()
        };
        p.write_stamped(&mut no_source, &Stamp::new("T", ""));
        assert_eq!(no_source, br#"{"msg_type":"publish","timestamp":"T"}"#);
    }

    #[test]
    fn timestamp_from_app_is_kept() {
        let mut d = StreamDecoder::new(Limits::default());
        d.input.feed(
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
