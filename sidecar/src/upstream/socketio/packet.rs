//! The Engine.IO v4 / Socket.IO v5 text packets the agent uses: decoding what the platform
//! sends and encoding what the agent emits. Pure.

use serde_json::Value;

/// Engine.IO packet of a WebSocket text frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Engine<'a> {
    Open(&'a str),
    Close,
    Ping(&'a str),
    Pong(&'a str),
    Message(&'a str),
    Other,
}

pub fn engine(text: &str) -> Option<Engine<'_>> {
    let rest = text.get(1..)?;
    Some(match text.as_bytes().first()? {
        b'0' => Engine::Open(rest),
        b'1' => Engine::Close,
        b'2' => Engine::Ping(rest),
        b'3' => Engine::Pong(rest),
        b'4' => Engine::Message(rest),
        b'5' | b'6' => Engine::Other,
        _ => return None,
    })
}

/// Socket.IO packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
    BinaryEvent,
    BinaryAck,
}

/// A decoded Socket.IO packet: `<type>[<attachments>-][<nsp>,][<id>][<json>]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    pub kind: Kind,
    pub nsp: String,
    pub id: Option<u64>,
    pub data: Option<Value>,
}

pub fn socket(s: &str) -> Result<Packet, String> {
    let b = s.as_bytes();
    let kind = match b.first() {
        Some(b'0') => Kind::Connect,
        Some(b'1') => Kind::Disconnect,
        Some(b'2') => Kind::Event,
        Some(b'3') => Kind::Ack,
        Some(b'4') => Kind::ConnectError,
        Some(b'5') => Kind::BinaryEvent,
        Some(b'6') => Kind::BinaryAck,
        _ => return Err(format!("unknown Socket.IO packet {:?}", truncate(s))),
    };
    let mut i = 1;
    if matches!(kind, Kind::BinaryEvent | Kind::BinaryAck) {
        // Attachment count; the attachments themselves are binary frames we do not use.
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if b.get(i) != Some(&b'-') {
            return Err("binary packet without attachment count".into());
        }
        i += 1;
    }
    let mut nsp = "/".to_owned();
    if b.get(i) == Some(&b'/') {
        let end = s[i..].find(',').map_or(s.len(), |p| i + p);
        nsp = s[i..end].to_owned();
        i = (end + 1).min(s.len());
    }
    let start = i;
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    let id = if i > start {
        Some(
            s[start..i]
                .parse()
                .map_err(|_| "acknowledgement id out of range".to_string())?,
        )
    } else {
        None
    };
    let data = if i < s.len() {
        Some(
            serde_json::from_str(&s[i..])
                .map_err(|e| format!("invalid JSON in Socket.IO packet: {e}"))?,
        )
    } else {
        None
    };
    Ok(Packet {
        kind,
        nsp,
        id,
        data,
    })
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(40);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Engine MESSAGE + socket CONNECT, with an optional auth payload.
pub fn connect(nsp_prefix: &str, auth: Option<&Value>) -> String {
    let mut s = format!("40{nsp_prefix}");
    if let Some(a) = auth {
        s.push_str(&a.to_string());
    }
    s
}

/// Engine MESSAGE + socket EVENT `[event, <args_json>]`; `args_json` is already-encoded
/// JSON (the batch body goes in without being parsed again).
pub fn event(nsp_prefix: &str, id: Option<u64>, event: &str, args_json: &str) -> String {
    let name = Value::from(event).to_string();
    let mut s = String::with_capacity(args_json.len() + name.len() + nsp_prefix.len() + 24);
    s.push_str("42");
    s.push_str(nsp_prefix);
    if let Some(id) = id {
        s.push_str(&id.to_string());
    }
    s.push('[');
    s.push_str(&name);
    s.push(',');
    s.push_str(args_json);
    s.push(']');
    s
}

/// Engine MESSAGE + socket ACK with one argument.
pub fn ack(nsp_prefix: &str, id: u64, arg: &Value) -> String {
    format!("43{nsp_prefix}{id}[{arg}]")
}

#[cfg(test)]
mod tests {
    use crate::upstream::socketio::packet;
    use serde_json::json;

    #[test]
    fn engine_packets() {
        use packet::Engine;
        assert_eq!(
            packet::engine(r#"0{"sid":"x"}"#),
            Some(Engine::Open(r#"{"sid":"x"}"#))
        );
        assert_eq!(packet::engine("2"), Some(Engine::Ping("")));
        assert_eq!(packet::engine("3probe"), Some(Engine::Pong("probe")));
        assert_eq!(
            packet::engine("42[\"a\"]"),
            Some(Engine::Message("2[\"a\"]"))
        );
        assert_eq!(packet::engine("1"), Some(Engine::Close));
        assert_eq!(packet::engine(""), None);
        assert_eq!(packet::engine("x"), None);
    }

    #[test]
    fn socket_packets_decode() {
        use packet::{Kind, Packet, socket};
        assert_eq!(
            socket(r#"0{"sid":"abc"}"#).unwrap(),
            Packet {
                kind: Kind::Connect,
                nsp: "/".into(),
                id: None,
                data: Some(json!({"sid":"abc"}))
            }
        );
        assert_eq!(
            socket(r#"2/cloud,12["flush",{"a":1}]"#).unwrap(),
            Packet {
                kind: Kind::Event,
                nsp: "/cloud".into(),
                id: Some(12),
                data: Some(json!(["flush", {"a": 1}]))
            }
        );
        assert_eq!(
            socket("37[]").unwrap(),
            Packet {
                kind: Kind::Ack,
                nsp: "/".into(),
                id: Some(7),
                data: Some(json!([]))
            }
        );
        assert_eq!(socket("1/cloud,").unwrap().kind, Kind::Disconnect);
        assert_eq!(
            socket(r#"4{"message":"Not authorized"}"#).unwrap().data,
            Some(json!({"message": "Not authorized"}))
        );
        let bin = socket(r#"51-3["up",{"_placeholder":true,"num":0}]"#).unwrap();
        assert_eq!((bin.kind, bin.id), (Kind::BinaryEvent, Some(3)));
        assert!(socket("2[oops").is_err());
        assert!(socket("9").is_err());
        assert!(socket("299999999999999999999999[]").is_err());
    }

    #[test]
    fn socket_packets_encode() {
        assert_eq!(packet::connect("", None), "40");
        assert_eq!(
            packet::connect("/cloud,", Some(&json!({"token": "t"}))),
            r#"40/cloud,{"token":"t"}"#
        );
        assert_eq!(
            packet::event("", Some(5), "messages", "[1,2]"),
            r#"425["messages",[1,2]]"#
        );
        assert_eq!(
            packet::event("/cloud,", None, "heartbeat", "{}"),
            r#"42/cloud,["heartbeat",{}]"#
        );
        assert_eq!(
            packet::ack("", 12, &json!({"ok": true})),
            r#"4312[{"ok":true}]"#
        );
        // What we encode decodes to the same thing.
        let p = packet::socket(&packet::event("/cloud,", Some(9), "e\"v", r#"{"x":[1]}"#)[1..])
            .unwrap();
        assert_eq!((p.nsp.as_str(), p.id), ("/cloud", Some(9)));
        assert_eq!(p.data, Some(json!(["e\"v", {"x": [1]}])));
    }
}
