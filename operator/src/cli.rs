//! The operator's command-line flags and log set-up: `nanogate-operator run` ([`RunOptions`],
//! with the webhook, hub and certificate flags in [`ServerOptions`]). Every default is stated
//! beside its flag and shows in `--help`.

use std::net::SocketAddr;
use std::time::Duration;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `nanogate-operator run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    /// Address of the admin server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "NANOGATE_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, env = "NANOGATE_LEASE_NAME", default_value = "nanogate-operator")]
    pub lease_name: String,
    /// Namespace of the leader-election Lease (default: `POD_NAMESPACE`, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Identity of this replica in the Lease (default: `POD_NAME`, else hostname and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Lease duration in seconds; a dead leader is replaced after at most this long.
    #[arg(long, default_value_t = 15)]
    pub lease_duration: u64,
    /// Run for leadership (disable only for a single replica in tests).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Reconcile gateways of this namespace only, and write only their status (default: all
    /// namespaces).
    #[arg(long, env = "NANOGATE_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Log format.
    #[arg(long, value_enum, env = "NANOGATE_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// At start, upgrade the stored AgentGateway CRD when it is of an older schema revision
    /// (Helm never upgrades a chart's `crds/`). Needs get/update on that CRD (the chart grants
    /// it with `crds.manage`, its default).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub manage_crd: bool,
    /// Webhook, hub and certificates.
    #[command(flatten)]
    pub servers: ServerOptions,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lease_name: "nanogate-operator".into(),
            lease_namespace: "default".into(),
            identity: None,
            lease_duration: 15,
            leader_elect: true,
            namespace: None,
            log_format: LogFormat::Text,
            manage_crd: false,
            servers: ServerOptions::default(),
        }
    }
}

/// Flags of the webhook, hub and certificates (`nanogate-operator run`).
#[derive(Clone, Debug, clap::Args)]
pub struct ServerOptions {
    /// Namespace the operator runs in: holds the certificate Secret; never injected.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "nanogate-system",
        id = "operator-namespace"
    )]
    pub operator_namespace: String,
    /// Admission webhook listen address (the chart sets 0.0.0.0:9443); off when not set.
    #[arg(long, env = "NANOGATE_WEBHOOK_ADDR")]
    pub webhook_addr: Option<SocketAddr>,
    /// Webhook connections at most; more wait in the listen backlog until one closes (the API
    /// server keeps a few keep-alive connections per replica).
    #[arg(long, default_value_t = 256)]
    pub webhook_max_connections: usize,
    /// Service in front of the webhook; its DNS names go into the serving certificate.
    #[arg(long, default_value = "nanogate-webhook")]
    pub webhook_service: String,
    /// MutatingWebhookConfigurations whose `caBundle` the operator keeps current.
    #[arg(long, value_delimiter = ',', default_value = "nanogate-injector")]
    pub mutating_webhook_configs: Vec<String>,
    /// ValidatingWebhookConfigurations whose `caBundle` the operator keeps current.
    #[arg(long, value_delimiter = ',', default_value = "nanogate-validator")]
    pub validating_webhook_configs: Vec<String>,
    /// Extra names for the serving certificate (DNS names or IPs, e.g. 127.0.0.1 when the
    /// webhook is registered by URL).
    #[arg(long, value_delimiter = ',')]
    pub extra_sans: Vec<String>,
    /// Control-channel hub listen address (the chart sets 0.0.0.0:7051); off when not set.
    #[arg(long, env = "NANOGATE_HUB_ADDR")]
    pub hub_addr: Option<SocketAddr>,
    /// `host:port` injected sidecars dial to reach the hub.
    #[arg(
        long,
        env = "NANOGATE_HUB_ADVERTISE",
        default_value = "nanogate-hub.nanogate-system.svc:7051"
    )]
    pub hub_advertise: String,
    /// Hub connections at most, authenticated or not; more are closed at once (counted as
    /// `nanogate_hub_connections_total{decision="deny",reason="connection_limit"}`).
    #[arg(long, default_value_t = 10_000)]
    pub hub_max_connections: usize,
    /// Hub handshakes (TLS, AgentHello, TokenReview) in progress at most; a new one drops the
    /// oldest (`reason="handshake_evicted"`).
    #[arg(long, default_value_t = 256)]
    pub hub_max_handshakes: usize,
    /// A hub handshake must be done within this long (`reason="handshake_timeout"`).
    #[arg(long, default_value = "10s", value_parser = parse_duration_flag)]
    pub hub_handshake_timeout: Duration,
    /// Bytes a peer may send the hub before its AgentHello is complete
    /// (`reason="pre_auth_bytes"`); a hello with its token is 1–2 KiB.
    #[arg(long, default_value_t = 64 * 1024)]
    pub hub_pre_auth_bytes: usize,
    /// One TokenReview (with the pod and gateway lookups) gets this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration_flag)]
    pub hub_token_review_timeout: Duration,
    /// TokenReviews in flight at most.
    #[arg(long, default_value_t = 16)]
    pub hub_token_review_concurrency: usize,
    /// An accepted token is trusted again without a TokenReview until its expiry, but for this
    /// long at most.
    #[arg(long, default_value = "5m", value_parser = parse_duration_flag)]
    pub hub_token_cache_ttl: Duration,
    /// How often the hub writes fleet health into gateway statuses.
    #[arg(long, default_value = "5s", value_parser = parse_duration_flag)]
    pub status_interval: Duration,
    /// Lifetime of the serving certificate the operator issues itself; it is renewed two
    /// thirds of the way through (counted from its 5-minute backdated start). Default 90 days.
    #[arg(long, default_value = "2160h", value_parser = parse_duration_flag)]
    pub webhook_cert_validity: Duration,
    /// Serve the certificate in this directory (`tls.crt`, `tls.key`, `ca.crt`: a cert-manager
    /// Secret) instead of making one; it is re-read every minute. The issuer keeps `caBundle`.
    #[arg(long)]
    pub webhook_cert_dir: Option<std::path::PathBuf>,
    /// Whether the cluster runs native sidecars (default: detected from the server version,
    /// ≥ 1.29).
    #[arg(long)]
    pub native_sidecars: Option<bool>,
    /// nano-agent image injected into pods whose gateway names none (default: this release's).
    #[arg(long, env = "NANOGATE_SIDECAR_IMAGE", default_value = crate::crd::DEFAULT_SIDECAR_IMAGE)]
    pub sidecar_image: String,
    /// Further images a gateway's `spec.sidecar.image` may name (repeatable or comma list):
    /// an exact reference, or a prefix ending in `:` (any tag of a repository), `@` (any
    /// digest) or `/` (any repository below). Others are refused; none by default.
    #[arg(long, value_delimiter = ',')]
    pub allowed_sidecar_images: Vec<String>,
}

impl Default for ServerOptions {
    /// Everything off; the same defaults as the flags otherwise.
    fn default() -> Self {
        Self {
            operator_namespace: "nanogate-system".into(),
            webhook_addr: None,
            webhook_max_connections: 256,
            webhook_service: "nanogate-webhook".into(),
            mutating_webhook_configs: vec!["nanogate-injector".into()],
            validating_webhook_configs: vec!["nanogate-validator".into()],
            extra_sans: Vec::new(),
            hub_addr: None,
            hub_advertise: "nanogate-hub.nanogate-system.svc:7051".into(),
            status_interval: Duration::from_secs(5),
            hub_max_connections: 10_000,
            hub_max_handshakes: 256,
            hub_handshake_timeout: Duration::from_secs(10),
            hub_pre_auth_bytes: 64 * 1024,
            hub_token_review_timeout: Duration::from_secs(5),
            hub_token_review_concurrency: 16,
            hub_token_cache_ttl: Duration::from_secs(300),
            native_sidecars: None,
            sidecar_image: crate::crd::DEFAULT_SIDECAR_IMAGE.into(),
            allowed_sidecar_images: Vec::new(),
            webhook_cert_dir: None,
            webhook_cert_validity: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

impl ServerOptions {
    /// Whether the webhook or the hub (and so the certificates) are wanted.
    pub fn enabled(&self) -> bool {
        self.webhook_addr.is_some() || self.hub_addr.is_some()
    }

    /// The hub's settings from these flags.
    pub fn hub_config(&self) -> crate::hub::HubConfig {
        crate::hub::HubConfig {
            max_connections: self.hub_max_connections,
            max_handshakes: self.hub_max_handshakes,
            handshake_timeout: self.hub_handshake_timeout,
            pre_auth_bytes: self.hub_pre_auth_bytes,
            ..Default::default()
        }
    }

    /// The sidecar image policy from `--sidecar-image` and `--allowed-sidecar-images`; an
    /// error saying which flag is wrong.
    pub fn sidecar_images(&self) -> anyhow::Result<crate::gateway::SidecarImages> {
        crate::gateway::SidecarImages::new(&self.sidecar_image, &self.allowed_sidecar_images)
            .map_err(anyhow::Error::msg)
    }

    /// The limits around the hub's TokenReviews from these flags.
    pub fn auth_limits(&self) -> crate::hub::AuthLimits {
        crate::hub::AuthLimits {
            timeout: self.hub_token_review_timeout,
            concurrency: self.hub_token_review_concurrency,
            cache_ttl: self.hub_token_cache_ttl,
            ..Default::default()
        }
    }
}

fn parse_duration_flag(s: &str) -> Result<Duration, String> {
    crate::crd::parse_duration(s)
}

/// Initialise tracing (`RUST_LOG`, default `info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
