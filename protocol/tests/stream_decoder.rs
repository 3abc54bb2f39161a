//! The app socket's stream decoder against the world (issue 15): what `serde_json` yields on
//! the whole stream is what the decoder yields however the stream is cut into reads, and no
//! message it accepts can fail to be written upstream.

use nanogate_protocol::app::{self, AppError, Decoded, Limits, Request, StreamDecoder};
use nanogate_protocol::testing::decode_reads;
use proptest::prelude::*;
use serde_json::{Value, json};

/// What the decoder made of a stream: each accepted publish as the JSON value the app sent
/// (envelope minus the stamped fields), each `msg_check` limit, each error, in order.
#[derive(Debug, Clone, PartialEq)]
enum Out {
    Publish(Value),
    Check(u32),
    Rejected(String),
    Fatal(String),
}

/// Feeds `chunks` one read at a time, decoding after each, then ends the stream.
fn decode(chunks: &[&[u8]], limits: Limits) -> Vec<Out> {
    decode_reads(&mut StreamDecoder::new(limits), chunks, |step| match step {
        Decoded::Request(Request::Publish(p)) => {
            let env = p.to_envelope("2026-12-03T00:00:00.000Z", "ns/pod");
            let mut v: Value = serde_json::from_slice(&env).unwrap_or_else(|e| {
                panic!(
                    "envelope {:?} is not JSON: {e}",
                    String::from_utf8_lossy(&env)
                )
            });
            let obj = v.as_object_mut().expect("envelope is an object");
            assert_eq!(obj.remove("source"), Some(json!("ns/pod")));
            assert!(obj.contains_key("timestamp"), "{obj:?}");
            Out::Publish(v)
        }
        Decoded::Request(Request::MsgCheck { limit }) => Out::Check(limit),
        Decoded::Rejected(e) => Out::Rejected(e.to_string()),
        // A fatal error, or the end of the stream inside a value.
        Decoded::Fatal(e) => Out::Fatal(e.reason().to_owned()),
        Decoded::NeedMore => unreachable!("the driver stops at NeedMore"),
    })
}

/// The oracle: serde_json's own stream deserializer over the whole input, mapped to what the
/// decoder must answer for each value.
fn oracle(input: &[u8]) -> Vec<Out> {
    serde_json::Deserializer::from_slice(input)
        .into_iter::<Value>()
        .map(|v| {
            let mut v = v.expect("the generated stream is valid JSON");
            match v.get("msg_type").and_then(Value::as_str) {
                Some("publish") => {
                    let obj = v.as_object_mut().expect("object");
                    obj.remove("source");
                    if obj.get("timestamp") == Some(&Value::Null) {
                        obj.remove("timestamp");
                    }
                    Out::Publish(v)
                }
                Some("msg_check") => Out::Check(
                    v.pointer("/context/limit")
                        .and_then(Value::as_u64)
                        .map_or(1, |l| (l as u32).clamp(1, 100)),
                ),
                _ => unreachable!("the generator makes publish and msg_check only"),
            }
        })
        .collect()
}

/// Compares stamped publishes without the timestamp the decoder added.
fn strip_stamps(mut out: Vec<Out>, input: &[Value]) -> Vec<Out> {
    let mut sent = input.iter();
    for o in &mut out {
        if let Out::Publish(v) = o {
            let had = sent
                .by_ref()
                .find(|m| m.get("msg_type") == Some(&json!("publish")))
                .and_then(|m| m.get("timestamp"))
                .is_some_and(|t| !t.is_null());
            if !had && let Some(obj) = v.as_object_mut() {
                obj.remove("timestamp");
            }
        }
    }
    out
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        // Floats with fractions and exponents: the numbers a read boundary splits after `21.`.
        (-1.0e12f64..1.0e12).prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        // Strings with escapes, quotes, backslashes, control characters and non-BMP text
        // (surrogate pairs when escaped).
        "[a-z\"\\\\/\\n\\t\u{1}é€😀 ]{0,12}".prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid message: publish (with data, tags, an app `source` or `timestamp` now and then,
/// extra fields) or msg_check.
fn message() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (
            json_value(),
            prop::collection::vec("[a-z]{1,4}", 0..4),
            prop::option::of(prop_oneof![Just(Value::Null), Just(json!("2020-01-01T00:00:00Z"))]),
            any::<bool>(),
            prop::option::of(json_value()),
        )
            .prop_map(|(data, tags, timestamp, spoof, extra)| {
                let mut m = json!({"msg_type": "publish", "data": data, "context": {"tags": tags}});
                if let Some(ts) = timestamp {
                    m["timestamp"] = ts;
                }
                if spoof {
                    m["source"] = json!("spoofed");
                }
                if let Some(x) = extra {
                    m["x_extra"] = x;
                }
                m
            }),
        1 => prop::option::of(0u32..500).prop_map(|limit| match limit {
            Some(l) => json!({"msg_type": "msg_check", "context": {"limit": l}}),
            None => json!({"msg_type": "msg_check"}),
        }),
    ]
}

/// A stream of messages: pretty or compact, separated by newlines, spaces or nothing.
fn stream() -> impl Strategy<Value = (Vec<Value>, Vec<u8>)> {
    (
        prop::collection::vec((message(), 0..4usize, any::<bool>()), 1..8),
        any::<bool>(),
    )
        .prop_map(|(msgs, leading)| {
            let mut bytes = Vec::new();
            if leading {
                bytes.extend_from_slice(b" \r\n\t");
            }
            let mut values = Vec::new();
            for (m, sep, pretty) in msgs {
                let text = if pretty {
                    serde_json::to_vec_pretty(&m)
                } else {
                    serde_json::to_vec(&m)
                };
                bytes.extend_from_slice(&text.expect("serialisable"));
                bytes.extend_from_slice([&b""[..], b"\n", b" ", b"\r\n"][sep]);
                values.push(m);
            }
            (values, bytes)
        })
}

/// Splits `input` into chunks of the given sizes (cycled), the last one taking the rest.
fn chunks<'a>(input: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = input;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].clamp(1, rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
        i += 1;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random chunk sizes: exactly what serde_json yields on the whole input.
    #[test]
    fn any_split_decodes_like_serde_json_on_the_whole_stream(
        (values, input) in stream(),
        sizes in prop::collection::vec(1usize..64, 1..16),
    ) {
        let want = oracle(&input);
        let whole = strip_stamps(decode(&[&input], Limits::default()), &values);
        prop_assert_eq!(&whole, &want);
        let split = strip_stamps(decode(&chunks(&input, &sizes), Limits::default()), &values);
        prop_assert_eq!(&split, &want);
    }

    /// One byte per read: every boundary at once (inside numbers, strings, escapes, between
    /// values).
    #[test]
    fn one_byte_reads_decode_like_serde_json((values, input) in stream()) {
        let want = oracle(&input);
        let bytes = strip_stamps(decode(&chunks(&input, &[1]), Limits::default()), &values);
        prop_assert_eq!(bytes, want);
    }

    /// Arbitrary bytes: the decoder never panics, and however the input is split it answers
    /// the same up to its first fatal error or oversized value.
    #[test]
    fn arbitrary_bytes_decode_the_same_however_split(
        input in prop::collection::vec(
            prop_oneof![
                Just(b'{'), Just(b'}'), Just(b'['), Just(b']'), Just(b'"'), Just(b'\\'),
                Just(b':'), Just(b','), Just(b' '), Just(b'1'), Just(b'.'), Just(b'u'),
                Just(b'd'), Just(b'8'), any::<u8>(),
            ],
            0..200,
        ),
        sizes in prop::collection::vec(1usize..16, 1..8),
    ) {
        let limits = Limits { max_message_bytes: 64, max_tags: 10 };
        // A value over the limit is rejected when it arrives whole and fatal when the
        // limit is passed before its end has arrived: both answer "too large", and the
        // comparison stops there.
        let cut = |v: Vec<Out>| -> Vec<Out> {
            v.into_iter()
                .take_while(|o| match o {
                    Out::Fatal(_) => false,
                    Out::Rejected(e) => !e.starts_with("message too large"),
                    _ => true,
                })
                .collect()
        };
        let whole = cut(decode(&[&input], limits));
        let split = cut(decode(&chunks(&input, &sizes), limits));
        prop_assert_eq!(whole, split);
    }
}

/// Issue 15, defect 2: a read that ends after `21.` cut a valid stream ("invalid number").
#[test]
fn a_read_ending_inside_a_number_is_not_an_error() {
    let input = br#"{"msg_type":"publish","data":{"sensor":"t1","value":21.5,"exp":-1.25e-3}}"#;
    for at in 0..input.len() {
        let (a, b) = input.split_at(at);
        let got = decode(&[a, b], Limits::default());
        assert!(
            matches!(got.as_slice(), [Out::Publish(_)]),
            "split at {at} ({:?}): {got:?}",
            String::from_utf8_lossy(a)
        );
    }
}

/// Issue 15, defect 1: a lone surrogate escape, or nesting past serde_json's recursion limit,
/// passed validation and then aborted the agent when the envelope re-parsed the message.
/// Both are now answered, and the connection goes on.
#[test]
fn what_a_json_parser_refuses_is_rejected_not_a_crash() {
    let deep = format!(
        r#"{{"msg_type":"publish","source":"x","data":{}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            br#"{"msg_type":"publish","source":"x","data":"\udc00"}"#.to_vec(),
            "unpaired UTF-16 surrogate",
        ),
        (
            br#"{"msg_type":"publish","data":"\ud800 then text"}"#.to_vec(),
            "unpaired UTF-16 surrogate",
        ),
        (
            br#"{"msg_type":"publish","data":{"k":"\ud83d\u0041"}}"#.to_vec(),
            "unpaired UTF-16 surrogate",
        ),
        (deep.into_bytes(), "nested deeper than"),
    ];
    let cases = cases.into_iter().chain([
        // Found by the socket_path fuzz target: serde_json skips unknown fields, even nested
        // ones, without checking their UTF-8, and the envelope copies them.
        (
            b"{\"msg_type\":\"publish\",\"context\":{\"x\":[\"1\xa6\"]}}".to_vec(),
            "not valid UTF-8",
        ),
        (
            b"{\"msg_type\":\"publish\",\"k\":\"\xff\",\"source\":\"s\"}".to_vec(),
            "not valid UTF-8",
        ),
        // Found by the stream_decoder fuzz target: the grammar allows any number, the
        // platform's parser does not.
        (
            br#"{"msg_type":"publish","data":3333333333333333E3333333333333333333333333333330}"#
                .to_vec(),
            "beyond the range of a 64-bit float",
        ),
    ]);
    for (mut input, want) in cases {
        input.extend_from_slice(br#"{"msg_type":"msg_check"}"#);
        let got = decode(&[&input], Limits::default());
        match got.as_slice() {
            [Out::Rejected(e), Out::Check(1)] => assert!(e.contains(want), "{e}"),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(&input)),
        }
    }
    // A correctly paired surrogate is fine, with and without an app `source`.
    for input in [
        &br#"{"msg_type":"publish","data":"\ud83d\ude00"}"#[..],
        br#"{"msg_type":"publish","source":"x","data":"\ud83d\ude00"}"#,
    ] {
        let mut got = decode(&[input], Limits::default());
        if let [Out::Publish(v)] = got.as_mut_slice() {
            v.as_object_mut().map(|o| o.remove("timestamp"));
        }
        assert_eq!(
            got,
            [Out::Publish(json!({"msg_type":"publish","data":"😀"}))],
            "{}",
            String::from_utf8_lossy(input)
        );
    }
}

/// The envelope leaves out the app's `source` and a `null` timestamp wherever they stand,
/// and never writes a key twice or a stray comma.
#[test]
fn envelope_drops_entries_anywhere_in_the_object() {
    let cases: &[&[u8]] = &[
        br#"{"source":"x","msg_type":"publish"}"#,
        br#"{ "source" : "x" , "msg_type":"publish" }"#,
        br#"{"msg_type":"publish","source":"x"}"#,
        br#"{"timestamp":null,"source":{"a":[1]},"msg_type":"publish","data":1}"#,
        br#"{"msg_type":"publish","timestamp":null,"data":1,"source":"x"}"#,
        br#"{"source":"x","timestamp":null,"msg_type":"publish"}"#,
    ];
    for input in cases {
        let mut dec = StreamDecoder::new(Limits::default());
        dec.input.feed(input);
        let Decoded::Request(Request::Publish(p)) = dec.next() else {
            panic!("{}", String::from_utf8_lossy(input))
        };
        let env = String::from_utf8(p.to_envelope("T", "ns/pod")).expect("UTF-8");
        let v: Value = serde_json::from_str(&env).unwrap_or_else(|e| panic!("{env}: {e}"));
        assert_eq!(env.matches("\"source\"").count(), 1, "{env}");
        assert_eq!(env.matches("\"timestamp\"").count(), 1, "{env}");
        assert_eq!(v["source"], "ns/pod", "{env}");
        assert_eq!(v["timestamp"], "T", "{env}");
        assert_eq!(v["msg_type"], "publish", "{env}");
    }
}

/// The TCP listener's payloads go through the same parse: what the socket refuses, it
/// refuses too.
#[test]
fn one_message_on_its_own_is_checked_like_the_stream() {
    let limits = Limits::default();
    assert!(matches!(
        app::parse_message(br#" {"msg_type":"publish","data":[1.5]} "#, &limits),
        Ok(Request::Publish(_))
    ));
    for (input, want) in [
        (
            &br#"{"msg_type":"publish","data":"\udc00"}"#[..],
            "surrogate",
        ),
        (br#"{"msg_type":"publish"} {}"#, "one JSON object"),
        (br#"[1]"#, "JSON object"),
        (br#"{"msg_type":"nope"}"#, "unknown msg_type"),
    ] {
        match app::parse_message(input, &limits) {
            Err(e @ (AppError::InvalidMessage(_) | AppError::UnknownMsgType(_))) => {
                assert!(e.to_string().contains(want), "{e}")
            }
            other => panic!("{}: {other:?}", String::from_utf8_lossy(input)),
        }
    }
}
