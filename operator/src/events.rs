//! Kubernetes events as every writer of the operator records them.
//!
//! kube's [`kube::runtime::events::Recorder`] folds an event into an earlier one of the same
//! type, reason, action and object — a series whose count and time go up while its note stays
//! the first one. That is right for a repeat, and wrong when the cause moved on (a Secret that
//! was missing now lacks a key): `kubectl describe` would keep showing the first message. So
//! the action carries a short digest of the note: the same message still folds into one series,
//! a new message is a new event.

use kube::runtime::events::{Event, EventType};

/// An event of `reason` whose `action` (a verb: `Reconcile`, `Admit`, …) is made distinct per
/// note.
pub fn event(type_: EventType, reason: impl Into<String>, action: &str, note: String) -> Event {
    // crc32: stable across restarts and replicas (std's hashers are randomly keyed).
    Event {
        type_,
        reason: reason.into(),
        action: format!("{action}-{:08x}", crc32fast::hash(note.as_bytes())),
        note: Some(note),
        secondary: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_note_folds_and_a_new_note_is_a_new_event() {
        let a = event(
            EventType::Warning,
            "SecretMissing",
            "Reconcile",
            "not found".into(),
        );
        let again = event(
            EventType::Warning,
            "SecretMissing",
            "Reconcile",
            "not found".into(),
        );
        let moved_on = event(
            EventType::Warning,
            "SecretMissing",
            "Reconcile",
            "no key".into(),
        );
        assert_eq!(a.action, again.action);
        assert_ne!(a.action, moved_on.action);
        assert!(a.action.starts_with("Reconcile-"), "{}", a.action);
        assert_eq!(a.note.as_deref(), Some("not found"));
        // The apiserver refuses actions longer than 128 characters.
        assert!(a.action.len() <= 128);
    }
}
