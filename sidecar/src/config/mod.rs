//! The agent's settings ([`Config`]): flags, environment and a config file — the agent's own
//! (option names as keys) or the operator's per-gateway file ([`gateway_file`]) — checked
//! as a whole ([`Config::validate`], with each transport's options in [`upstream`]); what a
//! reload from the hub may change is in [`reload`].
//!
//! Sources, lowest to highest precedence: built-in defaults < config file (`--config`, YAML or
//! JSON, keys are the long flag names in snake_case or kebab-case) < environment < flags.
//! Defaults live here and only here: they are the `default_value`s below, which is also what
//! `--help` prints next to every knob.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

/// Largest `max_in_flight` (the CRD's `spec.delivery.maxInFlight` has the same bound).
pub const MAX_IN_FLIGHT: usize = 64;

pub mod gateway_file;
pub mod reload;
pub mod upstream;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What the agent does when its spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OverflowPolicy {
    /// Answer "queue full, try again later" to the sender; nothing accepted is dropped.
    Reject,
    /// Drop the oldest undelivered messages (never the batches being delivered) to make room.
    DropOldest,
}

/// Transport to the platform (one module each under upstream/).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UpstreamKind {
    /// The Tendrl platform HTTP API.
    Http,
    /// NATS JetStream.
    Nats,
    /// Socket.IO v5 over WebSocket (cloud protocol).
    Socketio,
}

impl UpstreamKind {
    /// The name used in flags, files and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Nats => "nats",
            Self::Socketio => "socketio",
        }
    }
}

/// nano-agent: Tendrl-compatible socket gateway with durable batching to the platform.
///
/// Every option can also come from the environment (shown as [env: …]) or from a YAML/JSON
/// file given with --config whose keys are the option names (e.g. `flush_interval: 250ms`).
/// Precedence: flags > environment > file > defaults. Durations take humantime syntax (250ms,
/// 5m); sizes take bytes or KiB/MiB/GiB suffixes.
#[derive(Debug, Clone, Parser)]
#[command(name = "nano-agent", version, about, long_about = None)]
pub struct Config {
    /// Config file (YAML or JSON): the agent's own option names, or the per-gateway file the
    /// operator writes (ConfigMap `<gateway>-agent-config`, key `config.json`, with a
    /// `version`; see nanogate_protocol::sidecar_config).
    #[arg(long, env = "NANOGATE_CONFIG_FILE")]
    pub config: Option<PathBuf>,

    // ----- app socket -----
    /// Unix socket the apps write to (TENDRL_SOCKET is accepted too).
    #[arg(
        long,
        env = "TENDRL_SOCKET_PATH",
        default_value = "/var/lib/tendrl/tendrl_agent.sock"
    )]
    pub socket_path: PathBuf,
    /// Largest accepted message in bytes.
    #[arg(long, env = "NANOGATE_MAX_MESSAGE_BYTES", default_value = "1MiB", value_parser = parse_bytes_usize)]
    pub max_message_bytes: usize,
    /// Most tags allowed in context.tags.
    #[arg(long, env = "NANOGATE_MAX_TAGS", default_value_t = 10)]
    pub max_tags: usize,
    /// Most concurrent app connections; further connections wait in the accept backlog.
    #[arg(long, env = "NANOGATE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed; a message must also arrive
    /// whole within this long of its first byte (a trickling client is answered and closed).
    #[arg(long, env = "NANOGATE_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// How long an empty `msg_check` answer from the platform is repeated locally before
    /// the platform is asked again (polling apps then cost the platform one request per
    /// window, not one per poll); 0s asks every time. Not used with upstream_kind socketio,
    /// whose messages are pushed into the agent.
    #[arg(long, env = "NANOGATE_MSG_CHECK_CACHE", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub msg_check_cache: Duration,
    /// On SIGTERM/SIGINT: time allowed to deliver what is queued before exiting. The rest stays
    /// in the spool — delivered by the next start if the spool's volume survives (an emptyDir
    /// survives a container restart, not a pod deletion) — and is counted: an error log line,
    /// the `left_behind` gauges and a notification to the hub.
    #[arg(long, env = "NANOGATE_SHUTDOWN_DEADLINE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_deadline: Duration,

    // ----- upstream -----
    /// Transport to the platform: `http` (Tendrl platform API), `nats` (JetStream; app_url is
    /// then `nats://host:4222` or `tls://host:4222`, comma-separated for a cluster) or
    /// `socketio`.
    #[arg(long, env = "NANOGATE_UPSTREAM_KIND", value_enum, default_value_t = UpstreamKind::Http)]
    pub upstream_kind: UpstreamKind,
    /// Platform API base URL; the agent appends /entities/…. With upstream_kind nats: the
    /// NATS server URL(s).
    #[arg(
        long,
        env = "TENDRL_APP_URL",
        default_value = "https://app.tendrl.com/api"
    )]
    pub app_url: String,
    /// Platform API key (sent as `Authorization: Bearer`; never logged). With api_key_file,
    /// used only until that file can be read (an older pod spec has no such file).
    #[arg(long, env = "TENDRL_KEY", hide_env_values = true, default_value = "")]
    pub api_key: String,
    /// File holding the platform API key (the injector mounts the gateway's Secret and sets
    /// this). Read at start, again every api_key_reload_interval and after a 401/403, so an
    /// updated Secret is used without a restart; an unreadable or empty file keeps the last
    /// good key. Surrounding whitespace (a trailing newline) is not part of the key.
    #[arg(long, env = "TENDRL_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// How often api_key_file is re-read.
    #[arg(long, env = "NANOGATE_API_KEY_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub api_key_reload_interval: Duration,
    /// PEM file with extra CA certificates to trust for the platform (in addition to the
    /// public web roots).
    #[arg(long, env = "NANOGATE_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// PEM client certificate chain for mTLS to the platform (needs --upstream-client-key).
    #[arg(long, env = "NANOGATE_UPSTREAM_CLIENT_CERT")]
    pub upstream_client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long, env = "NANOGATE_UPSTREAM_CLIENT_KEY")]
    pub upstream_client_key: Option<PathBuf>,
    /// Do not verify the platform's TLS certificate: any certificate for any name is accepted
    /// (http, socketio and nats). The connection is then encrypted but not authenticated:
    /// for test platforms only. The agent logs a warning at start while it is on.
    #[arg(long, env = "NANOGATE_UPSTREAM_INSECURE_SKIP_VERIFY", default_value_t = false, action = clap::ArgAction::Set)]
    pub upstream_insecure_skip_verify: bool,
    /// Timeout of one upstream HTTP request.
    #[arg(long, env = "NANOGATE_UPSTREAM_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,
    /// First retry delay cap of the full-jitter exponential backoff.
    #[arg(long, env = "NANOGATE_BACKOFF_INITIAL", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub backoff_initial: Duration,
    /// Largest retry delay of the backoff.
    #[arg(long, env = "NANOGATE_BACKOFF_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,

    // ----- upstream_kind nats (JetStream) -----
    /// NATS subject template: `{namespace}`, `{gateway}` and `{pod}` are replaced by this
    /// pod's (made subject-safe); a message's `dest` is appended as further tokens
    /// (`nanogate.shop.orders` + dest `eu/berlin` → `nanogate.shop.orders.eu.berlin`).
    #[arg(
        long,
        env = "NANOGATE_NATS_SUBJECT",
        default_value = "nanogate.{namespace}.{gateway}"
    )]
    pub nats_subject: String,
    /// JetStream stream that stores the messages.
    #[arg(long, env = "NANOGATE_NATS_STREAM", default_value = "NANOGATE")]
    pub nats_stream: String,
    /// Create the stream when it is missing (subjects: the subject, `<subject>.>` and the
    /// inbox subject; file storage; duplicate window below). With false a missing stream is
    /// an error the agent retries until someone creates it.
    #[arg(long, env = "NANOGATE_NATS_CREATE_STREAM", default_value_t = true, action = clap::ArgAction::Set)]
    pub nats_create_stream: bool,
    /// Duplicate window of a stream the agent creates: a retried message (same
    /// `Nats-Msg-Id`) within this window is stored once.
    #[arg(long, env = "NANOGATE_NATS_DUPLICATE_WINDOW", default_value = "2m", value_parser = humantime::parse_duration)]
    pub nats_duplicate_window: Duration,
    /// Durable pull consumer that `msg_check` reads from (placeholders as in nats_subject;
    /// created on the stream when missing, filtered on nats_inbox_subject).
    #[arg(
        long,
        env = "NANOGATE_NATS_CONSUMER",
        default_value = "nanogate-{namespace}-{gateway}"
    )]
    pub nats_consumer: String,
    /// Subject of the messages for this gateway's apps, served by `msg_check`
    /// (placeholders as in nats_subject).
    #[arg(
        long,
        env = "NANOGATE_NATS_INBOX_SUBJECT",
        default_value = "nanogate-inbox.{namespace}.{gateway}"
    )]
    pub nats_inbox_subject: String,
    /// NATS credentials file (JWT + NKey seed, `.creds`). Authentication, first match wins:
    /// creds file, user + password file, token file, else api_key as a token when set.
    #[arg(long, env = "NANOGATE_NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,
    /// NATS user name (with nats_password_file).
    #[arg(long, env = "NANOGATE_NATS_USER")]
    pub nats_user: Option<String>,
    /// File holding the NATS password (with nats_user).
    #[arg(long, env = "NANOGATE_NATS_PASSWORD_FILE")]
    pub nats_password_file: Option<PathBuf>,
    /// File holding a NATS token.
    #[arg(long, env = "NANOGATE_NATS_TOKEN_FILE")]
    pub nats_token_file: Option<PathBuf>,

    // ----- upstream_kind socketio (cloud protocol: Socket.IO over WebSocket) -----
    /// Socket.IO namespace joined on the platform. With upstream_kind socketio, app_url is
    /// `wss://host[:port][/path]` (path default /socket.io/); the client certificate is
    /// upstream_client_cert/key and the platform's CA upstream_ca.
    #[arg(long, env = "NANOGATE_SOCKETIO_NAMESPACE", default_value = "/")]
    pub socketio_namespace: String,
    /// Interval of the `heartbeat` event to the platform (socketio).
    #[arg(long, env = "NANOGATE_SOCKETIO_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub socketio_heartbeat_interval: Duration,
    /// How long an emitted batch waits for the platform's acknowledgement before it is
    /// retried (socketio).
    #[arg(long, env = "NANOGATE_SOCKETIO_ACK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub socketio_ack_timeout: Duration,
    /// Messages from the platform (`deliver` commands) held for `msg_check`; when full,
    /// `deliver` is answered with an error (socketio).
    #[arg(long, env = "NANOGATE_SOCKETIO_INBOX_SIZE", default_value_t = 1000)]
    pub socketio_inbox_size: usize,

    // ----- batching (the Tendrl client configuration table; the formula is in delivery/sizing.rs) -----
    /// A partial batch is sent at the latest this long after its first message was queued.
    #[arg(long, env = "NANOGATE_FLUSH_INTERVAL", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,
    /// Messages per batch with an empty queue and no resource pressure.
    #[arg(long, env = "NANOGATE_BATCH_SIZE", default_value_t = 10)]
    pub batch_size: usize,
    /// Smallest batch target.
    #[arg(long, env = "NANOGATE_MIN_BATCH_SIZE", default_value_t = 10)]
    pub min_batch_size: usize,
    /// Largest batch.
    #[arg(long, env = "NANOGATE_MAX_BATCH_SIZE", default_value_t = 200)]
    pub max_batch_size: usize,
    /// Batch growth per queued message (target = batch_size + scale_factor × backlog).
    #[arg(long, env = "NANOGATE_SCALE_FACTOR", default_value_t = 0.5)]
    pub scale_factor: f64,
    /// Most bytes in one batch (its JSON array). Delivery holds each outstanding batch in
    /// memory (up to max_in_flight of them), plus a copy or two while sending or splitting it,
    /// so this bounds delivery's memory whatever the message sizes: 4 MiB × the default 4 in
    /// flight keeps a backlog of 1 MiB messages inside the default 64 MiB container limit. A single message larger than this still goes out, alone.
    /// Shrinks under memory pressure (see --target-mem-percent).
    #[arg(long, env = "NANOGATE_MAX_BATCH_BYTES", default_value = "4MiB", value_parser = parse_bytes_usize)]
    pub max_batch_bytes: usize,
    /// Backlog (messages waiting in the spool) at which dynamic sizing saturates. The spool,
    /// not memory, holds the queue: at most max_in_flight batches are in memory at a time.
    #[arg(long, env = "NANOGATE_MAX_QUEUE_SIZE", default_value_t = 1000)]
    pub max_queue_size: usize,
    /// CPU use (percent of one core) above which batches grow (fewer requests) and sends are
    /// spaced out.
    #[arg(long, env = "NANOGATE_TARGET_CPU_PERCENT", default_value_t = 70.0)]
    pub target_cpu_percent: f64,
    /// Memory use (the working set, in percent of the container's memory limit, or of the
    /// host without one) above which batches shrink, in messages and bytes, and sends are
    /// spaced out.
    #[arg(long, env = "NANOGATE_TARGET_MEM_PERCENT", default_value_t = 80.0)]
    pub target_mem_percent: f64,
    /// Minimum time between two batch sends.
    #[arg(long, env = "NANOGATE_MIN_BATCH_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub min_batch_interval: Duration,
    /// Longest spacing between batch sends under resource pressure.
    #[arg(long, env = "NANOGATE_MAX_BATCH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub max_batch_interval: Duration,
    /// Most batches outstanding with the platform at once (pipelined delivery): the next batch
    /// is sent while earlier ones wait for their answers, and the spool is still acknowledged
    /// in order (a batch only once every earlier one is delivered or dead-lettered), so a
    /// kill -9 resends at most these batches. While the platform fails, one batch at a time
    /// is sent; each success doubles the window back up to this. 1: one batch at a time.
    /// Each outstanding batch holds up to max_batch_bytes of memory.
    #[arg(long, env = "NANOGATE_MAX_IN_FLIGHT", default_value_t = nanogate_protocol::sidecar_config::DEFAULT_MAX_IN_FLIGHT as usize)]
    pub max_in_flight: usize,
    /// How often CPU and memory use are sampled (never per message).
    #[arg(long, env = "NANOGATE_RESOURCE_SAMPLE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub resource_sample_interval: Duration,

    /// Window over which the backlog (undelivered messages in the spool) must have grown for
    /// the agent to report itself backlogged (delivery slower than ingest): metric
    /// `nanogate_sidecar_backlogged`, heartbeats, the gateway's `SidecarsHealthy` reason
    /// `Backlogged`. Default 60s; the backlog is sampled ten times per window (100ms–5s apart).
    #[arg(long, env = "NANOGATE_BACKLOG_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    pub backlog_window: Duration,

    // ----- spool -----
    /// Directory of the on-disk write-ahead queue (put it on the pod's volume).
    #[arg(
        long,
        env = "NANOGATE_SPOOL_DIR",
        default_value = "/var/lib/tendrl/spool"
    )]
    pub spool_dir: PathBuf,
    /// Most bytes of undelivered messages kept; beyond it senders get "queue full" (or the
    /// oldest are dropped, see overflow_policy).
    #[arg(long, env = "NANOGATE_SPOOL_MAX_BYTES", default_value = "256MiB", value_parser = parse_bytes_u64)]
    pub spool_max_bytes: u64,
    /// When the spool is full: `reject` answers "queue full" to the sender (nothing accepted is
    /// lost); `drop-oldest` drops the oldest undelivered messages to make room (never the
    /// batches being delivered), counted in `dropped_oldest_total` and logged as a warning.
    #[arg(long, env = "NANOGATE_OVERFLOW_POLICY", value_enum, default_value_t = OverflowPolicy::Reject)]
    pub overflow_policy: OverflowPolicy,
    /// Size at which the spool starts a new segment file.
    #[arg(long, env = "NANOGATE_SPOOL_SEGMENT_BYTES", default_value = "8MiB", value_parser = parse_bytes_u64)]
    pub spool_segment_bytes: u64,
    /// How often appended data is fsync'ed (0s = on every append). Process crashes never lose
    /// appended data; this bounds what a machine crash can lose.
    #[arg(long, env = "NANOGATE_SPOOL_SYNC_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub spool_sync_interval: Duration,
    /// File that receives batches the platform rejected with a 4xx (JSON lines). Default:
    /// <spool_dir>/dead-letter.jsonl.
    #[arg(long, env = "NANOGATE_DEAD_LETTER_PATH")]
    pub dead_letter_path: Option<PathBuf>,

    // ----- TCP listener (SecureAgentMessaging frames; off by default) -----
    /// Address of the TCP listener (newline-delimited JSON frames, see the sidecar README),
    /// e.g. `127.0.0.1:7070`; off when unset. A non-loopback address (anything outside
    /// 127.0.0.0/8 and ::1, including 0.0.0.0) requires tcp_token and tcp_tls_cert/key.
    #[arg(long, env = "NANOGATE_TCP_LISTEN")]
    pub tcp_listen: Option<SocketAddr>,
    /// PEM certificate chain of the TCP listener; with tcp_tls_key the listener speaks TLS.
    #[arg(long, env = "NANOGATE_TCP_TLS_CERT")]
    pub tcp_tls_cert: Option<PathBuf>,
    /// PEM private key of tcp_tls_cert.
    #[arg(long, env = "NANOGATE_TCP_TLS_KEY")]
    pub tcp_tls_key: Option<PathBuf>,
    /// Token a TCP peer presents in its first frame (`{"type":"auth","token":…}`); required
    /// on a non-loopback tcp_listen. Never logged.
    #[arg(long, env = "NANOGATE_TCP_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    pub tcp_token: Option<Secret>,
    /// The listener sends a `keepalive` frame this often on every TCP connection.
    #[arg(long, env = "NANOGATE_TCP_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tcp_keepalive_interval: Duration,
    /// A TCP peer that sent no complete frame for this long is closed (measured from the
    /// peer's last frame, not from what the listener sent).
    #[arg(long, env = "NANOGATE_TCP_KEEPALIVE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub tcp_keepalive_timeout: Duration,

    // ----- admin, identity, logs -----
    /// Address of the admin HTTP server (/metrics, /healthz, /readyz).
    #[arg(long, env = "NANOGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9091")]
    pub admin_listen: SocketAddr,
    /// Pod name (downward API); with the namespace it forms each message's `source`.
    #[arg(long, env = "NANOGATE_POD_NAME")]
    pub pod_name: Option<String>,
    /// Pod namespace (downward API).
    #[arg(long, env = "NANOGATE_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// Pod UID (downward API); the agent id towards the hub.
    #[arg(long, env = "NANOGATE_POD_UID")]
    pub pod_uid: Option<String>,
    /// Admin port in a pod: listen on 0.0.0.0:<port> (an explicit admin_listen wins).
    #[arg(long, env = "NANOGATE_ADMIN_PORT")]
    pub admin_port: Option<u16>,

    // ----- control channel (operator hub) -----
    /// AgentGateway this agent serves (set by the injector).
    #[arg(long, env = "NANOGATE_GATEWAY")]
    pub gateway: Option<String>,
    /// `host:port` of the operator's hub; no control channel when unset.
    #[arg(long, env = "NANOGATE_HUB_ADDR")]
    pub hub_addr: Option<String>,
    /// PEM CA that signed the hub's certificate (required with hub_addr).
    #[arg(long, env = "NANOGATE_HUB_CA_FILE")]
    pub hub_ca_file: Option<PathBuf>,
    /// Projected service-account token for the hub (audience nanogate-hub), re-read on every
    /// connection because the kubelet rotates it.
    #[arg(
        long,
        env = "NANOGATE_HUB_TOKEN_FILE",
        default_value = "/var/run/secrets/nanogate-hub/token"
    )]
    pub hub_token_file: PathBuf,
    /// Heartbeat interval on the control channel.
    #[arg(long, env = "NANOGATE_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Generation of the configuration in use: crc32 of the config file's bytes, the same
    /// number the operator records as `status.configHash`; reported in heartbeats.
    #[arg(skip)]
    pub config_generation: i64,
    /// The command line this configuration was parsed from (a reload starts from it, so
    /// settings given as flags keep their values).
    #[arg(skip)]
    pub start_args: StartArgs,
    /// Runtime worker threads (the agent is I/O-bound; two are plenty and keep memory low).
    #[arg(long, env = "NANOGATE_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "NANOGATE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "NANOGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The command line a [`Config`] was parsed from. Its `Debug` shows only the count: flags can
/// carry secrets (`--tcp-token`).
#[derive(Clone, Default, PartialEq)]
pub struct StartArgs(pub Vec<OsString>);

impl std::fmt::Debug for StartArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{} arguments]", self.0.len())
    }
}

impl Config {
    /// Parses flags, environment and the config file, then validates. Errors name the field.
    pub fn load() -> anyhow::Result<Config> {
        Self::load_from(std::env::args_os())
    }

    /// [`Config::load`] with explicit arguments (the environment is still read).
    pub fn load_from<I, T>(args: I) -> anyhow::Result<Config>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Self::parse(args.into_iter().map(Into::into).collect(), None)
    }

    /// The configuration this process would have if it had started with `file_text` as its
    /// config file: the start's flags and environment keep their precedence over the file
    /// (a hub reload).
    pub fn with_file_text(&self, file_text: &str) -> anyhow::Result<Config> {
        Self::parse(self.start_args.0.clone(), Some(file_text))
    }

    /// Flags and environment, then the config file — `file_text`, else the `--config` file.
    fn parse(args: Vec<OsString>, file_text: Option<&str>) -> anyhow::Result<Config> {
        let matches = Config::command()
            .try_get_matches_from(&args)
            .map_err(exit_on_help)?;
        let first = Config::from_arg_matches(&matches)?;

        // The file only fills options that came from neither a flag nor the environment: the
        // agent's own format as flags parsed again, the operator's typed file applied.
        let mut extra: Vec<OsString> = Vec::new();
        let mut config_generation = 0;
        let file = match (file_text, &first.config) {
            (Some(text), _) => Some((text.to_string(), PathBuf::from("(from the hub)"))),
            (None, Some(path)) => Some((
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("config: cannot read {}: {e}", path.display()))?,
                path.clone(),
            )),
            (None, None) => None,
        };
        let mut gateway_file = None;
        if let Some((text, path)) = &file {
            let map: serde_yaml::Mapping = if text.trim().is_empty() {
                serde_yaml::Mapping::new()
            } else {
                serde_yaml::from_str(text).map_err(|e| {
                    anyhow::anyhow!(
                        "config file {}: not a YAML/JSON mapping: {e}",
                        path.display()
                    )
                })?
            };
            config_generation = i64::from(crc32fast::hash(text.as_bytes()));
            if gateway_file::is_gateway_config(&map) {
                // The operator's file: read typed, applied below.
                let gw = gateway_file::read(text)
                    .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
                gateway_file = Some((gw, path));
            } else {
                extra = flat_file_flags(map, path, &matches)?;
            }
        }
        let mut config = if extra.is_empty() {
            first
        } else {
            let mut all = args.clone();
            all.extend(extra);
            let m = Config::command().try_get_matches_from(&all).map_err(|e| {
                anyhow::anyhow!(
                    "config file: {}",
                    e.to_string().trim_start_matches("error: ")
                )
            })?;
            Config::from_arg_matches(&m)?
        };
        if let Some((gw, path)) = gateway_file {
            let socket_env = std::env::var_os("TENDRL_SOCKET").is_some();
            gateway_file::apply(&gw, &mut config, |id| {
                let given = matches!(
                    matches.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                );
                given || (id == "socket_path" && socket_env)
            })
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        }
        // `TENDRL_SOCKET` is the older name; `TENDRL_SOCKET_PATH` and the flag win over it.
        if matches!(
            matches.value_source("socket_path"),
            Some(ValueSource::DefaultValue)
        ) && let Some(p) = std::env::var_os("TENDRL_SOCKET")
        {
            config.socket_path = p.into();
        }
        if let Some(port) = config.admin_port
            && matches!(
                matches.value_source("admin_listen"),
                Some(ValueSource::DefaultValue) | None
            )
        {
            config.admin_listen = SocketAddr::from(([0, 0, 0, 0], port));
        }
        config.config_generation = config_generation;
        config.start_args = StartArgs(args);
        config.validate()?;
        Ok(config)
    }

    /// Cross-field checks clap cannot express.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if self.min_batch_size == 0 {
            bail!("invalid config: min_batch_size must be at least 1");
        }
        if self.max_batch_size < self.min_batch_size {
            bail!(
                "invalid config: max_batch_size ({}) must be >= min_batch_size ({})",
                self.max_batch_size,
                self.min_batch_size
            );
        }
        if !(self.min_batch_size..=self.max_batch_size).contains(&self.batch_size) {
            bail!(
                "invalid config: batch_size ({}) must be between min_batch_size ({}) and max_batch_size ({})",
                self.batch_size,
                self.min_batch_size,
                self.max_batch_size
            );
        }
        if !self.scale_factor.is_finite() || self.scale_factor < 0.0 {
            bail!(
                "invalid config: scale_factor ({}) must be a number >= 0",
                self.scale_factor
            );
        }
        for (name, v) in [
            ("target_cpu_percent", self.target_cpu_percent),
            ("target_mem_percent", self.target_mem_percent),
        ] {
            if !(v > 0.0 && v <= 100.0) {
                bail!("invalid config: {name} ({v}) must be in (0, 100]");
            }
        }
        if self.max_queue_size == 0 {
            bail!("invalid config: max_queue_size must be at least 1");
        }
        if !(1..=MAX_IN_FLIGHT).contains(&self.max_in_flight) {
            bail!(
                "invalid config: max_in_flight ({}) must be between 1 and {MAX_IN_FLIGHT}",
                self.max_in_flight
            );
        }
        if self.min_batch_interval > self.max_batch_interval {
            bail!("invalid config: min_batch_interval must not exceed max_batch_interval");
        }
        for (name, d) in [
            ("flush_interval", self.flush_interval),
            ("idle_timeout", self.idle_timeout),
            ("upstream_timeout", self.upstream_timeout),
            ("backoff_initial", self.backoff_initial),
            ("resource_sample_interval", self.resource_sample_interval),
            ("backlog_window", self.backlog_window),
        ] {
            if d.is_zero() {
                bail!("invalid config: {name} must be greater than 0");
            }
        }
        if self.backoff_initial > self.backoff_max {
            bail!("invalid config: backoff_initial must not exceed backoff_max");
        }
        if self.max_batch_bytes < 1024 {
            bail!("invalid config: max_batch_bytes must be at least 1KiB");
        }
        if self.max_message_bytes < 64 {
            bail!("invalid config: max_message_bytes must be at least 64");
        }
        if (self.max_message_bytes as u64) > self.spool_max_bytes {
            bail!("invalid config: spool_max_bytes must be at least max_message_bytes");
        }
        if self.spool_segment_bytes < 4096 {
            bail!("invalid config: spool_segment_bytes must be at least 4KiB");
        }
        if self.worker_threads == 0 {
            bail!("invalid config: worker_threads must be at least 1");
        }
        if self.max_connections == 0 {
            bail!("invalid config: max_connections must be at least 1");
        }
        match self.upstream_kind {
            UpstreamKind::Http => match reqwest::Url::parse(&self.app_url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                Ok(_) => bail!("invalid config: app_url must be an http:// or https:// URL"),
                Err(e) => bail!(
                    "invalid config: app_url ({}) is not a URL: {e}",
                    self.app_url
                ),
            },
            UpstreamKind::Nats => upstream::check_nats(self)?,
            UpstreamKind::Socketio => upstream::check_socketio(self)?,
        }
        if self.upstream_client_cert.is_some() != self.upstream_client_key.is_some() {
            bail!("invalid config: upstream_client_cert and upstream_client_key go together");
        }
        if self.hub_addr.is_some() {
            if self.hub_ca_file.is_none() {
                bail!("invalid config: hub_ca_file is required with hub_addr (the hub's CA, PEM)");
            }
            if self.pod_uid.is_none() {
                bail!("invalid config: pod_uid is required with hub_addr (it is the agent id)");
            }
            if self.heartbeat_interval.is_zero() {
                bail!("invalid config: heartbeat_interval must be greater than 0");
            }
        }
        self.validate_tcp()?;
        if self.socket_path.as_os_str().is_empty() {
            bail!("invalid config: socket_path must not be empty");
        }
        Ok(())
    }

    /// Checks of the TCP listener options.
    fn validate_tcp(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if self.tcp_tls_cert.is_some() != self.tcp_tls_key.is_some() {
            bail!("invalid config: tcp_tls_cert and tcp_tls_key go together");
        }
        if self
            .tcp_token
            .as_ref()
            .is_some_and(|t| t.expose().is_empty())
        {
            bail!("invalid config: tcp_token must not be empty");
        }
        let Some(addr) = self.tcp_listen else {
            return Ok(());
        };
        if self.tcp_keepalive_interval.is_zero() {
            bail!("invalid config: tcp_keepalive_interval must be greater than 0");
        }
        if self.tcp_keepalive_interval >= self.tcp_keepalive_timeout {
            bail!(
                "invalid config: tcp_keepalive_interval ({:?}) must be shorter than tcp_keepalive_timeout ({:?})",
                self.tcp_keepalive_interval,
                self.tcp_keepalive_timeout
            );
        }
        if !addr.ip().is_loopback() {
            if self.tcp_token.is_none() {
                bail!(
                    "invalid config: tcp_token (--tcp-token / NANOGATE_TCP_TOKEN) is required when tcp_listen ({addr}) is not a loopback address"
                );
            }
            if self.tcp_tls_cert.is_none() {
                bail!(
                    "invalid config: tcp_tls_cert and tcp_tls_key are required when tcp_listen ({addr}) is not a loopback address (the token must not cross the network in clear)"
                );
            }
        }
        Ok(())
    }

    /// `source` stamped on every message: `namespace/pod`, else the host name.
    pub fn source(&self) -> String {
        match (&self.pod_namespace, &self.pod_name) {
            (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
            (None, Some(pod)) => pod.clone(),
            _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
        }
    }

    /// Where rejected batches go.
    pub fn dead_letter_file(&self) -> PathBuf {
        self.dead_letter_path
            .clone()
            .unwrap_or_else(|| self.spool_dir.join("dead-letter.jsonl"))
    }
}

/// The agent's own config file (option names as keys) as flags for the options that came from
/// neither a flag nor the environment: parsed again with them, file values go through the very
/// same parsers and error messages as flags.
fn flat_file_flags(
    map: serde_yaml::Mapping,
    path: &std::path::Path,
    matches: &clap::ArgMatches,
) -> anyhow::Result<Vec<OsString>> {
    let mut extra = Vec::new();
    let cmd = Config::command();
    for (key, value) in map {
        let key = key.as_str().ok_or_else(|| {
            anyhow::anyhow!("config file {}: keys must be strings", path.display())
        })?;
        let id = key.replace('-', "_");
        if id == "config" || !cmd.get_arguments().any(|a| a.get_id().as_str() == id) {
            anyhow::bail!(
                "config file {}: unknown field `{key}` (see --help for the option names)",
                path.display()
            );
        }
        let value = match value {
            serde_yaml::Value::String(s) => s,
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            _ => anyhow::bail!(
                "config file {}: field `{key}` must be a string, number or boolean",
                path.display()
            ),
        };
        let from_default = matches!(
            matches.value_source(&id),
            Some(ValueSource::DefaultValue) | None
        );
        let socket_env = id == "socket_path" && std::env::var_os("TENDRL_SOCKET").is_some();
        if from_default && !socket_env {
            extra.push(format!("--{}={value}", id.replace('_', "-")).into());
        }
    }
    Ok(extra)
}

/// `--help` and `--version` are not errors: print and exit 0.
fn exit_on_help(e: clap::Error) -> anyhow::Error {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => e.exit(),
        _ => anyhow::anyhow!("{}", e.to_string().trim_start_matches("error: ").trim_end()),
    }
}

fn parse_bytes_u64(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n.trim(), *m)))
    .unwrap_or((s, 1));
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("`{s}` is not a size (e.g. 1048576, 512KiB, 1MiB, 2GiB)"))
}

/// A secret option value: `Debug` never shows it, so printing the config cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The value, for the one place that compares or sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s))
}

fn parse_bytes_usize(s: &str) -> Result<usize, String> {
    parse_bytes_u64(s).and_then(|n| usize::try_from(n).map_err(|e| e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_from(["nano-agent"]).unwrap();
        assert_eq!(c.flush_interval, Duration::from_millis(250));
        assert_eq!(c.max_message_bytes, 1 << 20);
        assert_eq!(c.max_batch_size, 200);
    }

    #[test]
    fn file_fills_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "flush_interval: 2s\nmax-batch-size: 50\nbatch_size: 20\n",
        )
        .unwrap();
        let c = Config::load_from([
            "nano-agent".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
            "--batch-size=30".as_ref(),
        ])
        .unwrap();
        assert_eq!(c.flush_interval, Duration::from_secs(2));
        assert_eq!(c.max_batch_size, 50);
        assert_eq!(c.batch_size, 30);
    }

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"flush_intervl": "2s"}"#).unwrap();
        let e = Config::load_from(["nano-agent".as_ref(), "--config".as_ref(), path.as_os_str()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("flush_intervl"), "{e}");
        std::fs::write(&path, r#"{"flush_interval": "soon"}"#).unwrap();
        let e = Config::load_from(["nano-agent".as_ref(), "--config".as_ref(), path.as_os_str()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("flush-interval"), "{e}");
        let e = Config::load_from(["nano-agent", "--batch-size=500"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch_size"), "{e}");
    }

    #[test]
    fn tcp_listener_options() {
        let c = Config::load_from(["nano-agent"]).unwrap();
        assert_eq!(c.tcp_listen, None, "off by default");
        assert_eq!(c.tcp_keepalive_interval, Duration::from_secs(10));
        assert_eq!(c.tcp_keepalive_timeout, Duration::from_secs(30));
        Config::load_from(["nano-agent", "--tcp-listen", "127.0.0.1:7070"]).unwrap();
        Config::load_from(["nano-agent", "--tcp-listen", "[::1]:7070"]).unwrap();
        let err = |args: &[&str]| {
            let mut all = vec!["nano-agent"];
            all.extend_from_slice(args);
            Config::load_from(all).unwrap_err().to_string()
        };
        let e = err(&["--tcp-listen", "0.0.0.0:7070"]);
        assert!(e.contains("tcp_token") && e.contains("--tcp-token"), "{e}");
        let e = err(&["--tcp-listen", "10.1.2.3:7070", "--tcp-token", "t"]);
        assert!(e.contains("tcp_tls_cert"), "{e}");
        let e = err(&["--tcp-tls-cert", "/c.pem"]);
        assert!(e.contains("tcp_tls_key"), "{e}");
        let e = err(&["--tcp-token", ""]);
        assert!(e.contains("tcp_token"), "{e}");
        let e = err(&[
            "--tcp-listen",
            "127.0.0.1:7070",
            "--tcp-keepalive-interval",
            "30s",
        ]);
        assert!(e.contains("tcp_keepalive_interval"), "{e}");
        let c = Config::load_from([
            "nano-agent",
            "--tcp-listen",
            "0.0.0.0:7070",
            "--tcp-token",
            "hunter2",
            "--tcp-tls-cert",
            "/c.pem",
            "--tcp-tls-key",
            "/k.pem",
        ])
        .unwrap();
        assert_eq!(c.tcp_token.as_ref().map(Secret::expose), Some("hunter2"));
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "Debug hides the token"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes_u64("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes_u64("4096"), Ok(4096));
        assert!(parse_bytes_u64("lots").is_err());
    }
}
