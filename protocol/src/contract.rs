//! Contract validation of the cloud protocol's commands (the `socketio` upstream,
//! `sidecar/README.md`).
//!
//! Every command the platform sends is checked against a declared [`Contract`] before it runs:
//! required fields, their types (number, string, non-empty string, ISO-8601 date, boolean,
//! list, optional, nested contract) and the base fields `correlation_id`, `action`,
//! `requested_at`. A violation is answered with [`error_reply`]:
//! `{"status":"error","error":"Missing required field: …" | "Invalid field type: …", action,
//! correlation_id}`. Pure: no I/O, no clock.

use serde_json::{Map, Value};

/// The type a field must have.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldType {
    /// A JSON number.
    Number,
    /// A JSON string (may be empty).
    String,
    /// A JSON string with at least one non-whitespace character.
    NonEmptyString,
    /// A string holding an ISO-8601 date or date-time (`2025-11-20`,
    /// `2025-11-20T20:30:45.123456`, `…Z`, `…+02:00`).
    Date,
    /// `true` or `false`.
    Boolean,
    /// A JSON array whose every element has the given type.
    List(Box<FieldType>),
    /// The field may be absent or `null`; when present it has the given type.
    Optional(Box<FieldType>),
    /// A JSON object validated against its own contract.
    Nested(Contract),
    /// Any JSON value except `null` (payloads the agent passes on untouched).
    Any,
}

impl FieldType {
    /// `List(t)`.
    pub fn list(t: FieldType) -> Self {
        Self::List(Box::new(t))
    }
    /// `Optional(t)`.
    pub fn optional(t: FieldType) -> Self {
        Self::Optional(Box::new(t))
    }

    /// Name used in "expected …" messages.
    pub fn name(&self) -> String {
        match self {
            Self::Number => "number".into(),
            Self::String => "string".into(),
            Self::NonEmptyString => "non-empty string".into(),
            Self::Date => "ISO-8601 date".into(),
            Self::Boolean => "boolean".into(),
            Self::List(t) => format!("list of {}", t.name()),
            Self::Optional(t) => t.name(),
            Self::Nested(_) => "object".into(),
            Self::Any => "any value".into(),
        }
    }
}

/// Declared fields of a message, checked in order (the first violation is reported).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Contract {
    fields: Vec<(String, FieldType)>,
}

impl Contract {
    /// An empty contract (accepts any object).
    pub fn new() -> Self {
        Self::default()
    }

    /// The seed's `BASE_MESSAGE`: `correlation_id` number, `action` string, `requested_at` date.
    pub fn base() -> Self {
        Self::new()
            .field("correlation_id", FieldType::Number)
            .field("action", FieldType::String)
            .field("requested_at", FieldType::Date)
    }

    /// Adds (or replaces) a field.
    pub fn field(mut self, name: &str, t: FieldType) -> Self {
        match self.fields.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = t,
            None => self.fields.push((name.to_owned(), t)),
        }
        self
    }

    /// Declared fields in order.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &FieldType)> {
        self.fields.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Checks `value` (must be an object) against the contract. Extra fields are allowed.
    pub fn validate(&self, value: &Value) -> Result<(), Violation> {
        match value {
            Value::Object(map) => self.validate_object(map, ""),
            _ => Err(Violation::InvalidType {
                field: "payload".into(),
                expected: "object".into(),
                got: kind(value),
            }),
        }
    }

    fn validate_object(&self, map: &Map<String, Value>, prefix: &str) -> Result<(), Violation> {
        for (name, t) in &self.fields {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match (map.get(name), t) {
                (None | Some(Value::Null), FieldType::Optional(_)) => {}
                (None, _) => return Err(Violation::Missing(path)),
                (Some(v), FieldType::Optional(inner)) => check(v, inner, &path)?,
                (Some(v), t) => check(v, t, &path)?,
            }
        }
        Ok(())
    }
}

fn check(v: &Value, t: &FieldType, path: &str) -> Result<(), Violation> {
    let bad = || Violation::InvalidType {
        field: path.to_owned(),
        expected: t.name(),
        got: kind(v),
    };
    match t {
        FieldType::Number if v.is_number() => Ok(()),
        FieldType::String if v.is_string() => Ok(()),
        FieldType::NonEmptyString if v.as_str().is_some_and(|s| !s.trim().is_empty()) => Ok(()),
        FieldType::Date if v.as_str().is_some_and(is_iso8601) => Ok(()),
        FieldType::Boolean if v.is_boolean() => Ok(()),
        FieldType::List(inner) => match v {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, item)| check(item, inner, &format!("{path}[{i}]"))),
            _ => Err(bad()),
        },
        FieldType::Optional(_) if v.is_null() => Ok(()),
        FieldType::Optional(inner) => check(v, inner, path),
        FieldType::Nested(c) => match v {
            Value::Object(map) => c.validate_object(map, path),
            _ => Err(bad()),
        },
        FieldType::Any if !v.is_null() => Ok(()),
        _ => Err(bad()),
    }
}

/// JSON kind of a value for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(s) if s.trim().is_empty() => "empty string",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// Why a message does not satisfy its contract. `Display` is the seed's error text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A required field is absent (dotted path for nested fields).
    #[error("Missing required field: {0}")]
    Missing(String),
    /// A field has the wrong type.
    #[error("Invalid field type: {field} (expected {expected}, got {got})")]
    InvalidType {
        field: String,
        expected: String,
        got: &'static str,
    },
}

/// `{"status":"error","error":…,"action":…,"correlation_id":…}`, echoing `action` and
/// `correlation_id` from `request` (`null` when absent), so the platform can match the reply.
pub fn error_reply(error: &str, request: &Value) -> Value {
    serde_json::json!({
        "status": "error",
        "error": error,
        "action": request.get("action").cloned().unwrap_or(Value::Null),
        "correlation_id": request.get("correlation_id").cloned().unwrap_or(Value::Null),
    })
}

/// `{"status":"ok","action":…,"correlation_id":…, …fields}` for a command that succeeded.
pub fn ok_reply(request: &Value, fields: Map<String, Value>) -> Value {
    let mut out = Map::new();
    out.insert(
        "action".into(),
        request.get("action").cloned().unwrap_or(Value::Null),
    );
    out.insert(
        "correlation_id".into(),
        request
            .get("correlation_id")
            .cloned()
            .unwrap_or(Value::Null),
    );
    out.insert("status".into(), "ok".into());
    out.extend(fields);
    Value::Object(out)
}

/// A date of every form [`is_iso8601`] accepts: what a reader of these dates (the agent
/// turns them into instants) must read too.
pub const ISO8601_FORMS: [&str; 8] = [
    "2025-11-20",
    "2025-11-20T20:30",
    "2025-11-20T20:30:45",
    "2025-11-20T20:30:45.123456",
    "2025-11-20T20:30:45Z",
    "2025-11-20 20:30:45,5+02:00",
    "2024-02-29T00:00:00-0130",
    "2025-12-31T23:59:60+05",
];

/// Whether `s` is an ISO-8601 calendar date, optionally followed by `T` (or a space) and a
/// time `HH:MM[:SS[.fraction]]` with an optional zone `Z`, `±HH:MM`, `±HHMM` or `±HH`.
pub fn is_iso8601(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |from: usize, n: usize| -> Option<u32> {
        let part = b.get(from..from + n)?;
        part.iter().all(u8::is_ascii_digit).then(|| {
            part.iter()
                .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'))
        })
    };
    let (Some(year), Some(month), Some(day)) = (digits(0, 4), digits(5, 2), digits(8, 2)) else {
        return false;
    };
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return false;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > month_days {
        return false;
    }
    if b.len() == 10 {
        return true;
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
        return false;
    }
    let (Some(hour), Some(minute)) = (digits(11, 2), digits(14, 2)) else {
        return false;
    };
    if b.get(13) != Some(&b':') || hour > 23 || minute > 59 {
        return false;
    }
    let mut i = 16;
    if b.get(i) == Some(&b':') {
        match digits(i + 1, 2) {
            Some(sec) if sec <= 60 => i += 3,
            _ => return false,
        }
        if matches!(b.get(i), Some(b'.' | b',')) {
            let start = i + 1;
            i = start;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return false;
            }
        }
    }
    match b.get(i) {
        None => true,
        Some(b'Z' | b'z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            let zone = s.get(i + 1..).unwrap_or_default();
            let ok = |h: u32, m: u32| h <= 23 && m <= 59;
            match zone.len() {
                2 => digits(i + 1, 2).is_some_and(|h| ok(h, 0)),
                4 => matches!((digits(i + 1, 2), digits(i + 3, 2)), (Some(h), Some(m)) if ok(h, m)),
                5 => {
                    zone.as_bytes().get(2) == Some(&b':')
                        && matches!((digits(i + 1, 2), digits(i + 4, 2)), (Some(h), Some(m)) if ok(h, m))
                }
                _ => false,
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn every_kind() -> Contract {
        Contract::base()
            .field("name", FieldType::NonEmptyString)
            .field("note", FieldType::String)
            .field("enabled", FieldType::Boolean)
            .field("tags", FieldType::list(FieldType::String))
            .field("limit", FieldType::optional(FieldType::Number))
            .field(
                "period",
                FieldType::Nested(
                    Contract::new()
                        .field("start", FieldType::Date)
                        .field("end", FieldType::optional(FieldType::Date)),
                ),
            )
            .field("data", FieldType::Any)
    }

    fn valid() -> Value {
        json!({
            "correlation_id": 42, "action": "get_consumption",
            "requested_at": "2025-11-20T20:30:45.123456",
            "name": "x", "note": "", "enabled": true, "tags": ["a", "b"],
            "period": {"start": "2025-11-20T20:00:00Z"}, "data": {"k": 1}, "extra": [1]
        })
    }

    fn with(field: &str, v: Value) -> Value {
        let mut m = valid();
        m[field] = v;
        m
    }

    fn without(field: &str) -> Value {
        let mut m = valid();
        m.as_object_mut().unwrap().remove(field);
        m
    }

    #[test]
    fn valid_message_passes_and_extra_fields_are_allowed() {
        assert_eq!(every_kind().validate(&valid()), Ok(()));
        assert_eq!(every_kind().validate(&with("limit", json!(5))), Ok(()));
        assert_eq!(every_kind().validate(&with("limit", Value::Null)), Ok(()));
        assert_eq!(every_kind().validate(&with("tags", json!([]))), Ok(()));
    }

    #[test]
    fn missing_fields_are_named_in_order() {
        let c = every_kind();
        for f in [
            "correlation_id",
            "action",
            "requested_at",
            "name",
            "enabled",
            "period",
        ] {
            let e = c.validate(&without(f)).unwrap_err();
            assert_eq!(e, Violation::Missing(f.into()));
            assert_eq!(e.to_string(), format!("Missing required field: {f}"));
        }
        let e = c.validate(&with("period", json!({}))).unwrap_err();
        assert_eq!(e.to_string(), "Missing required field: period.start");
        // `null` is not a value for a required field.
        let e = c.validate(&with("name", Value::Null)).unwrap_err();
        assert!(e.to_string().starts_with("Invalid field type: name"), "{e}");
    }

    #[test]
    fn wrong_types_are_named_for_every_kind() {
        let c = every_kind();
        for (field, value, needle) in [
            (
                "correlation_id",
                json!("42"),
                "correlation_id (expected number, got string)",
            ),
            ("action", json!(7), "action (expected string, got number)"),
            (
                "requested_at",
                json!("yesterday"),
                "requested_at (expected ISO-8601 date",
            ),
            (
                "name",
                json!("  "),
                "name (expected non-empty string, got empty string)",
            ),
            ("note", json!(false), "note (expected string, got boolean)"),
            (
                "enabled",
                json!("true"),
                "enabled (expected boolean, got string)",
            ),
            (
                "tags",
                json!("a"),
                "tags (expected list of string, got string)",
            ),
            (
                "tags",
                json!(["a", 1]),
                "tags[1] (expected string, got number)",
            ),
            ("limit", json!("5"), "limit (expected number, got string)"),
            (
                "period",
                json!("today"),
                "period (expected object, got string)",
            ),
            (
                "period",
                json!({"start": "2025-11-20", "end": 3}),
                "period.end (expected ISO-8601 date, got number)",
            ),
        ] {
            let e = c.validate(&with(field, value)).unwrap_err().to_string();
            assert!(e.starts_with("Invalid field type: "), "{e}");
            assert!(e.contains(needle), "{e} does not contain {needle}");
        }
        let e = c.validate(&json!([1])).unwrap_err().to_string();
        assert_eq!(e, "Invalid field type: payload (expected object, got list)");
    }

    #[test]
    fn replies_echo_action_and_correlation_id() {
        let req = json!({"action": "flush", "correlation_id": 7});
        assert_eq!(
            error_reply("Missing required field: requested_at", &req),
            json!({"status": "error", "error": "Missing required field: requested_at",
                   "action": "flush", "correlation_id": 7})
        );
        let mut extra = Map::new();
        extra.insert("pending".into(), 0.into());
        assert_eq!(
            ok_reply(&req, extra),
            json!({"action": "flush", "correlation_id": 7, "status": "ok", "pending": 0})
        );
        assert_eq!(error_reply("x", &json!({}))["action"], Value::Null);
    }

    #[test]
    fn iso8601_dates() {
        for ok in ISO8601_FORMS {
            assert!(is_iso8601(ok), "{ok}");
        }
        for bad in [
            "",
            "2025",
            "2025-13-01",
            "2025-02-29",
            "2025-11-31",
            "2025-11-20T24:00",
            "2025-11-20T20:61",
            "2025-11-20T20:30:45.",
            "2025-11-20T20:30:45Zx",
            "2025-11-20T20:30:45+2",
            "20251120",
            "2025/11/20",
            "2025-11-20X",
        ] {
            assert!(!is_iso8601(bad), "{bad}");
        }
    }
}
