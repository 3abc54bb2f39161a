//! Messages sidecars left undelivered at shutdown (`left_behind` notifications, sent by an
//! agent whose shutdown deadline passed before its spool was empty).
//!
//! A report is about a pod that is about to be gone, so it is kept per gateway, not per
//! sidecar: the connection records it in the [`LeftBehindLedger`]; the status writer adds what
//! is not yet written to the gateway's `status.leftBehind` — a running total stored in the
//! gateway itself, so it outlives pods and operator restarts — and records one Warning event
//! per report. A report is subtracted from the ledger only once a status write carried it.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Resource as _;
use kube::runtime::events::{EventType, Recorder};
use tracing::warn;

use crate::crd::{AgentGateway, AgentGatewayStatus, LeftBehindStats};

/// Reason of the Warning event recorded on the gateway for each report.
pub const EVENT_REASON: &str = "MessagesLeftBehind";

/// One sidecar's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub pod: String,
    pub messages: u64,
    pub bytes: u64,
    pub reason: String,
    /// When the hub received it, as Unix seconds.
    pub at_unix: i64,
}

impl Report {
    /// The event's note.
    pub fn note(&self) -> String {
        format!(
            "pod {} left {} messages ({} bytes) undelivered at shutdown ({}); they are lost unless its spool volume survives (an emptyDir survives a container restart, not a pod deletion)",
            self.pod, self.messages, self.bytes, self.reason
        )
    }
}

/// Reports of one gateway not yet in its status, or not yet announced by an event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unwritten {
    pub messages: u64,
    pub bytes: u64,
    pub shutdowns: u64,
    /// The most recent report's pod and time (Unix seconds).
    pub last: Option<(String, i64)>,
}

impl Unwritten {
    pub fn is_empty(&self) -> bool {
        self.shutdowns == 0
    }
}

#[derive(Debug, Default)]
struct GatewayLedger {
    unwritten: Unwritten,
    unannounced: Vec<Report>,
}

/// Reports by gateway (`namespace`, `name`) until the status writer has written and
/// announced them.
#[derive(Debug, Default)]
pub struct LeftBehindLedger {
    gateways: Mutex<HashMap<(String, String), GatewayLedger>>,
}

/// Reports kept for events per gateway; a flood beyond this is still counted, not announced
/// one by one.
const MAX_UNANNOUNCED: usize = 100;

impl LeftBehindLedger {
    /// Records a report from a sidecar of `namespace/gateway`.
    pub fn record(&self, namespace: &str, gateway: &str, report: Report) {
        let mut gateways = self.lock();
        let entry = gateways
            .entry((namespace.to_string(), gateway.to_string()))
            .or_default();
        let u = &mut entry.unwritten;
        u.messages = u.messages.saturating_add(report.messages);
        u.bytes = u.bytes.saturating_add(report.bytes);
        u.shutdowns = u.shutdowns.saturating_add(1);
        u.last = Some((report.pod.clone(), report.at_unix));
        if entry.unannounced.len() < MAX_UNANNOUNCED {
            entry.unannounced.push(report);
        }
    }

    /// What the gateway's status does not show yet.
    pub fn unwritten(&self, namespace: &str, gateway: &str) -> Unwritten {
        self.lock()
            .get(&(namespace.to_string(), gateway.to_string()))
            .map(|g| g.unwritten.clone())
            .unwrap_or_default()
    }

    /// `written` (an earlier [`unwritten`](Self::unwritten)) is in the gateway's status now;
    /// reports recorded since stay.
    pub fn written(&self, namespace: &str, gateway: &str, written: &Unwritten) {
        let mut gateways = self.lock();
        let key = (namespace.to_string(), gateway.to_string());
        let Some(entry) = gateways.get_mut(&key) else {
            return;
        };
        let u = &mut entry.unwritten;
        u.messages = u.messages.saturating_sub(written.messages);
        u.bytes = u.bytes.saturating_sub(written.bytes);
        u.shutdowns = u.shutdowns.saturating_sub(written.shutdowns);
        if u.shutdowns == 0 {
            u.last = None;
        }
        if u.is_empty() && entry.unannounced.is_empty() {
            gateways.remove(&key);
        }
    }

    /// The reports not yet announced by an event, oldest first.
    pub fn take_unannounced(&self, namespace: &str, gateway: &str) -> Vec<Report> {
        let mut gateways = self.lock();
        let key = (namespace.to_string(), gateway.to_string());
        let Some(entry) = gateways.get_mut(&key) else {
            return Vec::new();
        };
        let reports = std::mem::take(&mut entry.unannounced);
        if entry.unwritten.is_empty() {
            gateways.remove(&key);
        }
        reports
    }

    /// Drops the reports of gateways for which `exists` is false (deleted: there is no status
    /// to write them to); each dropped gateway is logged with its unwritten count.
    pub fn forget_deleted(&self, exists: impl Fn(&str, &str) -> bool) {
        self.lock().retain(|(namespace, gateway), entry| {
            let keep = exists(namespace, gateway);
            if !keep && !entry.unwritten.is_empty() {
                warn!(%namespace, %gateway, messages = entry.unwritten.messages,
                      "gateway deleted; its sidecars' left-behind messages are only in the hub's log and metrics");
            }
            keep
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), GatewayLedger>> {
        // Plain counters: a panic elsewhere while holding the lock leaves them usable.
        self.gateways.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `status` with `unwritten` added to its `leftBehind` totals (pure; nothing to add leaves
/// the status as it is).
pub fn add_to_status(status: &mut AgentGatewayStatus, unwritten: &Unwritten) {
    if unwritten.is_empty() {
        return;
    }
    let stats = status
        .left_behind
        .get_or_insert_with(LeftBehindStats::default);
    let add = |total: i64, n: u64| total.saturating_add(i64::try_from(n).unwrap_or(i64::MAX));
    stats.messages_total = add(stats.messages_total, unwritten.messages);
    stats.bytes_total = add(stats.bytes_total, unwritten.bytes);
    stats.shutdowns_total = add(stats.shutdowns_total, unwritten.shutdowns);
    if let Some((pod, at)) = &unwritten.last {
        stats.last_pod = Some(pod.clone());
        stats.last_time = Timestamp::from_second(*at).ok().map(Time);
    }
}

/// A Warning event on `gateway` for each report not yet announced. Best effort, as every
/// event here: a failure is logged, the status still counts the messages.
pub async fn announce(recorder: &Recorder, ledger: &LeftBehindLedger, gateway: &AgentGateway) {
    let (Some(namespace), Some(name)) = (
        gateway.metadata.namespace.as_deref(),
        gateway.metadata.name.as_deref(),
    ) else {
        return;
    };
    for report in ledger.take_unannounced(namespace, name) {
        let event =
            crate::events::event(EventType::Warning, EVENT_REASON, "Shutdown", report.note());
        if let Err(error) = recorder.publish(&event, &gateway.object_ref(&())).await {
            warn!(%error, %namespace, gateway = %name, pod = %report.pod, "publishing the left-behind event failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(pod: &str, messages: u64, at: i64) -> Report {
        Report {
            pod: pod.into(),
            messages,
            bytes: messages * 10,
            reason: "shutdown deadline".into(),
            at_unix: at,
        }
    }

    #[test]
    fn totals_accumulate_in_the_status_and_outlive_the_reports() {
        let ledger = LeftBehindLedger::default();
        ledger.record("ns", "gw", report("pod-1", 5, 1_000));
        ledger.record("ns", "gw", report("pod-2", 7, 1_010));
        ledger.record("ns", "other", report("pod-3", 1, 1_020));

        // A status that already counted earlier shutdowns.
        let mut status = AgentGatewayStatus {
            left_behind: Some(LeftBehindStats {
                messages_total: 100,
                bytes_total: 1_000,
                shutdowns_total: 2,
                last_pod: Some("old".into()),
                last_time: None,
            }),
            ..Default::default()
        };
        let unwritten = ledger.unwritten("ns", "gw");
        add_to_status(&mut status, &unwritten);
        assert_eq!(
            status.left_behind,
            Some(LeftBehindStats {
                messages_total: 112,
                bytes_total: 1_120,
                shutdowns_total: 4,
                last_pod: Some("pod-2".into()),
                last_time: Timestamp::from_second(1_010).ok().map(Time),
            })
        );

        // A report arriving between the read and the write stays for the next pass.
        ledger.record("ns", "gw", report("pod-4", 3, 1_030));
        ledger.written("ns", "gw", &unwritten);
        let rest = ledger.unwritten("ns", "gw");
        assert_eq!((rest.messages, rest.shutdowns), (3, 1));
        assert_eq!(rest.last, Some(("pod-4".into(), 1_030)));
        ledger.written("ns", "gw", &rest);
        assert!(ledger.unwritten("ns", "gw").is_empty());

        // Nothing to add: the status is left as it is (no write).
        let before = status.clone();
        add_to_status(&mut status, &Unwritten::default());
        assert_eq!(status, before);
        assert_eq!(ledger.unwritten("ns", "other").messages, 1);
    }

    #[test]
    fn each_report_is_announced_once() {
        let ledger = LeftBehindLedger::default();
        ledger.record("ns", "gw", report("pod-1", 5, 1_000));
        let reports = ledger.take_unannounced("ns", "gw");
        assert_eq!(reports, vec![report("pod-1", 5, 1_000)]);
        assert_eq!(
            reports[0].note(),
            "pod pod-1 left 5 messages (50 bytes) undelivered at shutdown (shutdown deadline); \
             they are lost unless its spool volume survives (an emptyDir survives a container \
             restart, not a pod deletion)"
        );
        assert!(ledger.take_unannounced("ns", "gw").is_empty());
        // Still counted until written.
        assert_eq!(ledger.unwritten("ns", "gw").messages, 5);
    }

    #[test]
    fn deleted_gateways_are_forgotten() {
        let ledger = LeftBehindLedger::default();
        ledger.record("ns", "gone", report("pod-1", 5, 1_000));
        ledger.record("ns", "gw", report("pod-2", 1, 1_000));
        ledger.forget_deleted(|_, gateway| gateway == "gw");
        assert!(ledger.unwritten("ns", "gone").is_empty());
        assert!(ledger.take_unannounced("ns", "gone").is_empty());
        assert_eq!(ledger.unwritten("ns", "gw").messages, 1);
    }
}
