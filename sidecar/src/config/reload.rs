//! What a reload from the hub can change in a running agent: the batching knobs apply live
//! ([`LIVE_FIELDS`]); sockets, connections and the spool are set up once at start, so a new
//! value of those ([`RESTART_FIELDS`]) waits for a restart and [`needs_restart`] names it.
//! A unit test of `gateway_file` fails when a setting of the operator's file is in neither list.

use super::Config;

/// Declares which settings a running agent cannot change (sockets, connections and the spool
/// are set up once at start): [`needs_restart`] names those that differ, and
/// [`RESTART_FIELDS`] lists them for the test that every gateway setting is covered.
macro_rules! restart_fields {
    ($($field:ident),* $(,)?) => {
        /// Settings a reload cannot apply to the running agent.
        pub const RESTART_FIELDS: &[&str] = &[$(stringify!($field)),*];

        /// The settings of `new` that differ from the running `old` and need a restart.
        pub fn needs_restart(new: &Config, old: &Config) -> Vec<&'static str> {
            let mut changed = Vec::new();
            $(if new.$field != old.$field {
                changed.push(stringify!($field));
            })*
            changed
        }
    };
}

restart_fields!(
    upstream_kind,
    app_url,
    upstream_timeout,
    upstream_ca,
    upstream_client_cert,
    upstream_client_key,
    upstream_insecure_skip_verify,
    nats_subject,
    nats_stream,
    nats_consumer,
    nats_inbox_subject,
    nats_creds_file,
    socketio_namespace,
    socketio_heartbeat_interval,
    socketio_ack_timeout,
    socketio_inbox_size,
    socket_path,
    max_message_bytes,
    max_tags,
    msg_check_cache,
    spool_max_bytes,
    spool_sync_interval,
    overflow_policy,
    backoff_initial,
    backoff_max,
    heartbeat_interval,
    log_level,
    tcp_listen,
    tcp_tls_cert,
    tcp_tls_key,
    tcp_keepalive_interval,
    tcp_keepalive_timeout,
);

/// Settings a reload applies to the running agent: delivery's live tuning (`Tuning`, delivery/sizing.rs).
pub const LIVE_FIELDS: &[&str] = &[
    "flush_interval",
    "batch_size",
    "min_batch_size",
    "max_batch_size",
    "scale_factor",
    "max_queue_size",
    "target_cpu_percent",
    "target_mem_percent",
    "min_batch_interval",
    "max_batch_interval",
    "max_in_flight",
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_reload_names_exactly_the_settings_that_need_a_restart() {
        let running = Config::load_from([
            "nano-agent",
            "--socket-path=/tmp/a.sock",
            "--spool-dir=/tmp/s",
            "--flush-interval=3s",
        ])
        .unwrap();
        // Batching knobs are live; the start's flags keep their precedence over the file.
        let new = running
            .with_file_text("max_batch_size: 500\nflush_interval: 100ms\n")
            .unwrap();
        assert_eq!(new.max_batch_size, 500);
        assert_eq!(new.flush_interval, Duration::from_secs(3));
        assert!(needs_restart(&new, &running).is_empty());
        // The socket's limits are set up once.
        let new = running.with_file_text("max_tags: 5\n").unwrap();
        assert_eq!(needs_restart(&new, &running), ["max_tags"]);
        let refused = running.with_file_text("max_batch_size: 0\n").unwrap_err();
        assert!(
            format!("{refused:#}").contains("max_batch_size"),
            "{refused:#}"
        );
    }
}
