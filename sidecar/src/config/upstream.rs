//! The transports' own options, resolved and checked (part of [`Config::validate`], so a bad
//! value fails at start or in a reload, not at the first delivery): the NATS subjects and
//! names filled from their templates ([`NatsNames`]), the socketio endpoint parsed from
//! `app_url` and `socketio_namespace` ([`SocketIoEndpoint`]). The transports connect with them.

use async_nats::ServerAddr;

use super::Config;

// ----- nats -----

/// Replaces the characters a subject token (or stream/consumer name) must not contain.
pub fn safe_token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() { "_".into() } else { t }
}

/// Fills `{namespace}`, `{gateway}` and `{pod}` in `template`.
fn render(template: &str, config: &Config, field: &str) -> anyhow::Result<String> {
    let mut out = template.to_string();
    for (name, value, flag) in [
        (
            "{namespace}",
            config.pod_namespace.as_deref(),
            "--pod-namespace",
        ),
        ("{gateway}", config.gateway.as_deref(), "--gateway"),
        ("{pod}", config.pod_name.as_deref(), "--pod-name"),
    ] {
        if out.contains(name) {
            let Some(value) = value else {
                anyhow::bail!(
                    "invalid config: {field} ({template}) uses {name} but it is not known; set {flag} or remove {name}"
                );
            };
            out = out.replace(name, &safe_token(value));
        }
    }
    if out.contains('{') || out.contains('}') {
        anyhow::bail!(
            "invalid config: {field} ({template}) has an unknown placeholder; use {{namespace}}, {{gateway}} or {{pod}}"
        );
    }
    Ok(out)
}

/// A publishable subject: dot-separated non-empty tokens, no wildcards, no whitespace.
fn check_subject(subject: &str, field: &str) -> anyhow::Result<()> {
    let bad = subject.is_empty()
        || subject
            .split('.')
            .any(|t| t.is_empty() || t == "*" || t == ">" || t.chars().any(|c| c.is_whitespace()))
        || subject.contains(['*', '>']);
    anyhow::ensure!(
        !bad,
        "invalid config: {field} ({subject}) is not a NATS subject: dot-separated tokens without spaces or wildcards"
    );
    Ok(())
}

/// A stream or consumer name: no `.`, `*`, `>`, whitespace or path separators.
fn check_name(name: &str, field: &str) -> anyhow::Result<()> {
    let bad = name.is_empty()
        || name
            .chars()
            .any(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace());
    anyhow::ensure!(
        !bad,
        "invalid config: {field} ({name}) must be a name without '.', '*', '>', '/' or spaces"
    );
    Ok(())
}

/// The resolved names (templates filled and checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsNames {
    pub subject: String,
    pub inbox: String,
    pub stream: String,
    pub consumer: String,
    pub servers: Vec<String>,
}

impl NatsNames {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let subject = render(&config.nats_subject, config, "nats_subject")?;
        check_subject(&subject, "nats_subject")?;
        let inbox = render(&config.nats_inbox_subject, config, "nats_inbox_subject")?;
        check_subject(&inbox, "nats_inbox_subject")?;
        anyhow::ensure!(
            inbox != subject && !inbox.starts_with(&format!("{subject}.")),
            "invalid config: nats_inbox_subject ({inbox}) must not be nats_subject or under it, or msg_check would return the agent's own messages"
        );
        let stream = config.nats_stream.clone();
        check_name(&stream, "nats_stream")?;
        let consumer = render(&config.nats_consumer, config, "nats_consumer")?;
        check_name(&consumer, "nats_consumer")?;
        let servers: Vec<String> = config
            .app_url
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        anyhow::ensure!(
            !servers.is_empty(),
            "invalid config: app_url must name a NATS server (nats://host:4222 or tls://host:4222)"
        );
        for s in &servers {
            anyhow::ensure!(
                (s.starts_with("nats://") || s.starts_with("tls://"))
                    && s.parse::<ServerAddr>().is_ok(),
                "invalid config: app_url ({s}) must be nats://host:port or tls://host:port with upstream_kind nats"
            );
        }
        Ok(Self {
            subject,
            inbox,
            stream,
            consumer,
            servers,
        })
    }

    /// Subject of a message with destination `dest`.
    pub fn subject_for(&self, dest: Option<&str>) -> String {
        let mut s = self.subject.clone();
        if let Some(dest) = dest {
            for token in dest.split(['.', '/']).filter(|t| !t.trim().is_empty()) {
                s.push('.');
                s.push_str(&safe_token(token.trim()));
            }
        }
        s
    }

    /// Subjects a stream needs to capture everything this agent publishes and reads.
    pub fn stream_subjects(&self) -> [String; 3] {
        [
            self.subject.clone(),
            format!("{}.>", self.subject),
            self.inbox.clone(),
        ]
    }
}

/// Checks the nats options of `config` .
pub fn check_nats(config: &Config) -> anyhow::Result<()> {
    NatsNames::from_config(config)?;
    if config.nats_user.is_some() != config.nats_password_file.is_some() {
        anyhow::bail!("invalid config: nats_user and nats_password_file go together");
    }
    if config.nats_duplicate_window.is_zero() {
        anyhow::bail!("invalid config: nats_duplicate_window must be greater than 0");
    }
    Ok(())
}

// ----- socketio -----

/// Checks of the socketio options (with upstream_kind socketio).
pub fn check_socketio(config: &Config) -> anyhow::Result<()> {
    socketio_endpoint(&config.app_url, &config.socketio_namespace)
        .map_err(|e| anyhow::anyhow!("invalid config: app_url / socketio_namespace: {e}"))?;
    if config.socketio_heartbeat_interval.is_zero() || config.socketio_ack_timeout.is_zero() {
        anyhow::bail!(
            "invalid config: socketio_heartbeat_interval and socketio_ack_timeout must be greater than 0"
        );
    }
    if config.socketio_inbox_size == 0 {
        anyhow::bail!("invalid config: socketio_inbox_size must be at least 1");
    }
    Ok(())
}

/// Where to connect: parsed once from the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketIoEndpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `ws(s)://host:port/path/?EIO=4&transport=websocket`
    pub request_url: String,
    /// Namespace as written in packets: empty for `/`, else `/name,`.
    pub nsp_prefix: String,
}

pub fn socketio_endpoint(url: &str, namespace: &str) -> Result<SocketIoEndpoint, String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let (tls, scheme) = match u.scheme() {
        "wss" | "https" => (true, "wss"),
        "ws" | "http" => (false, "ws"),
        other => {
            return Err(format!(
                "scheme {other:?} is not supported by the socketio upstream; use wss:// (or ws://, https://, http://)"
            ));
        }
    };
    let host = u
        .host_str()
        .ok_or_else(|| format!("{url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = u
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let path = match u.path() {
        "" | "/" => "/socket.io/".to_owned(),
        p if p.ends_with('/') => p.to_owned(),
        p => format!("{p}/"),
    };
    let mut query = String::from("EIO=4&transport=websocket");
    if let Some(q) = u.query() {
        query = format!("{q}&{query}");
    }
    let host_in_url = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    if !namespace.starts_with('/') || namespace.contains(',') {
        return Err(format!(
            "socketio namespace {namespace:?} must start with / and contain no comma"
        ));
    }
    Ok(SocketIoEndpoint {
        tls,
        request_url: format!("{scheme}://{host_in_url}:{port}{path}?{query}"),
        host,
        port,
        nsp_prefix: nsp_prefix(namespace),
    })
}

/// The namespace as written in a packet: nothing for `/`, else `/name,`.
pub fn nsp_prefix(namespace: &str) -> String {
    if namespace == "/" || namespace.is_empty() {
        String::new()
    } else {
        format!("{namespace},")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn config(args: &[&str]) -> Config {
        let base = [
            "--upstream-kind=nats",
            "--app-url=nats://127.0.0.1:4222",
            "--pod-namespace=shop",
            "--gateway=orders",
        ];
        let name = |a: &str| a.split('=').next().unwrap_or_default().to_string();
        let mut all = vec!["nano-agent"];
        all.extend(
            base.iter()
                .filter(|b| !args.iter().any(|a| name(a) == name(b))),
        );
        all.extend_from_slice(args);
        Config::parse_from(all)
    }

    #[test]
    fn subjects_from_template_and_dest() {
        let names = NatsNames::from_config(&config(&[])).unwrap();
        assert_eq!(names.subject, "nanogate.shop.orders");
        assert_eq!(names.inbox, "nanogate-inbox.shop.orders");
        assert_eq!(names.consumer, "nanogate-shop-orders");
        assert_eq!(names.subject_for(None), "nanogate.shop.orders");
        assert_eq!(
            names.subject_for(Some("eu/berlin.42")),
            "nanogate.shop.orders.eu.berlin.42"
        );
        assert_eq!(
            names.subject_for(Some("a b.*.>..x")),
            "nanogate.shop.orders.a_b._._.x"
        );
        let c = config(&["--pod-namespace=we.ird ns", "--nats-subject=p.{namespace}"]);
        assert_eq!(NatsNames::from_config(&c).unwrap().subject, "p.we_ird_ns");
    }

    #[test]
    fn bad_settings_name_the_field() {
        for (args, needle) in [
            (vec!["--nats-subject=a..b"], "nats_subject"),
            (vec!["--nats-subject=a.*"], "nats_subject"),
            (vec!["--nats-subject=a.{nope}"], "placeholder"),
            (vec!["--nats-stream=A.B"], "nats_stream"),
            (
                vec!["--nats-inbox-subject=nanogate.{namespace}.{gateway}.in"],
                "nats_inbox_subject",
            ),
            (vec!["--app-url=https://x"], "app_url"),
            (vec!["--nats-user=u"], "nats_password_file"),
        ] {
            let e = check_nats(&config(&args)).unwrap_err().to_string();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
        let mut c = config(&[]);
        c.gateway = None;
        let e = check_nats(&c).unwrap_err().to_string();
        assert!(e.contains("--gateway"), "{e}");
    }

    #[test]
    fn endpoints() {
        let e = socketio_endpoint("wss://platform.example", "/").unwrap();
        assert_eq!(
            e,
            SocketIoEndpoint {
                tls: true,
                host: "platform.example".into(),
                port: 443,
                request_url: "wss://platform.example:443/socket.io/?EIO=4&transport=websocket"
                    .into(),
                nsp_prefix: String::new(),
            }
        );
        let e = socketio_endpoint("http://127.0.0.1:8080/edge/socket.io?x=1", "/cloud").unwrap();
        assert!(!e.tls);
        assert_eq!(
            e.request_url,
            "ws://127.0.0.1:8080/edge/socket.io/?x=1&EIO=4&transport=websocket"
        );
        assert_eq!(e.nsp_prefix, "/cloud,");
        assert_eq!(
            socketio_endpoint("wss://[::1]:9/", "/").unwrap().host,
            "::1"
        );
        assert!(
            socketio_endpoint("nats://x", "/")
                .unwrap_err()
                .contains("wss://")
        );
        assert!(
            socketio_endpoint("wss://x", "cloud")
                .unwrap_err()
                .contains("start with /")
        );
    }
}
