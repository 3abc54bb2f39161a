//! The Secrets a gateway references, as one list. The reconciler reads it to check that each
//! exists with its keys (`dereference`; it has no Secret watch, so a missing Secret is
//! retried, see `controller::secret_retry`); the injector reads it for the Secrets it mounts
//! into the sidecar and where. A new Secret reference in the spec is added here, once, and every one of
//! them follows.

use crate::crd::AgentGatewaySpec;

use crate::names::{
    API_KEY_DIR, API_KEY_FILE, API_KEY_VOLUME, NATS_CREDENTIALS_DIR, NATS_CREDENTIALS_VOLUME,
    TCP_TLS_DIR, TCP_TLS_VOLUME, TCP_TOKEN_ENV, UPSTREAM_CA_DIR, UPSTREAM_CA_VOLUME,
    UPSTREAM_CLIENT_CERT_DIR, UPSTREAM_CLIENT_CERT_VOLUME,
};

/// How a referenced Secret reaches the sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SidecarUse {
    /// One key, as this environment variable of the sidecar (`valueFrom.secretKeyRef`).
    Env(&'static str),
    /// The Secret as a read-only volume `volume`, mounted at `dir`.
    Mount {
        volume: &'static str,
        dir: &'static str,
    },
    /// Its one key only, as file `dir/file` of a read-only volume `volume`. A Secret volume
    /// follows updates of the Secret (an environment variable does not): for a credential
    /// that is rotated while pods run.
    MountKey {
        volume: &'static str,
        dir: &'static str,
        file: &'static str,
    },
}

/// One Secret a gateway references (same namespace as the gateway).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    /// The spec field that names it, e.g. `spec.upstream.apiKeySecretRef`.
    pub field: &'static str,
    /// Name of the Secret.
    pub name: String,
    /// Keys the sidecar needs in it.
    pub keys: Vec<String>,
    /// How the sidecar gets it.
    pub sidecar: SidecarUse,
}

/// Every Secret `spec` references, in a stable order (the API key first).
pub fn secret_refs(spec: &AgentGatewaySpec) -> Vec<SecretRef> {
    let u = &spec.upstream;
    let mut refs = vec![SecretRef {
        field: "spec.upstream.apiKeySecretRef",
        name: u.api_key_secret_ref.name.clone(),
        keys: vec![u.api_key_secret_ref.key.clone()],
        // A file, not only `TENDRL_KEY`: the sidecar re-reads it, so rotation needs no restart.
        sidecar: SidecarUse::MountKey {
            volume: API_KEY_VOLUME,
            dir: API_KEY_DIR,
            file: API_KEY_FILE,
        },
    }];
    if let Some(tls) = &u.tls {
        if let Some(ca) = &tls.ca_secret_ref {
            refs.push(SecretRef {
                field: "spec.upstream.tls.caSecretRef",
                name: ca.name.clone(),
                keys: vec![ca.key.clone()],
                sidecar: SidecarUse::Mount {
                    volume: UPSTREAM_CA_VOLUME,
                    dir: UPSTREAM_CA_DIR,
                },
            });
        }
        if let Some(client) = &tls.client_cert_secret_ref {
            refs.push(SecretRef {
                field: "spec.upstream.tls.clientCertSecretRef",
                name: client.name.clone(),
                keys: vec!["tls.crt".into(), "tls.key".into()],
                sidecar: SidecarUse::Mount {
                    volume: UPSTREAM_CLIENT_CERT_VOLUME,
                    dir: UPSTREAM_CLIENT_CERT_DIR,
                },
            });
        }
    }
    if let Some(creds) = u
        .nats
        .as_ref()
        .and_then(|n| n.credentials_secret_ref.as_ref())
    {
        refs.push(SecretRef {
            field: "spec.upstream.nats.credentialsSecretRef",
            name: creds.name.clone(),
            keys: vec![creds.key.clone()],
            sidecar: SidecarUse::Mount {
                volume: NATS_CREDENTIALS_VOLUME,
                dir: NATS_CREDENTIALS_DIR,
            },
        });
    }
    if let Some(tcp) = &spec.tcp_listener {
        refs.push(SecretRef {
            field: "spec.tcpListener.tokenSecretRef",
            name: tcp.token_secret_ref.name.clone(),
            keys: vec![tcp.token_secret_ref.key.clone()],
            sidecar: SidecarUse::Env(TCP_TOKEN_ENV),
        });
        refs.push(SecretRef {
            field: "spec.tcpListener.tlsSecretRef",
            name: tcp.tls_secret_ref.name.clone(),
            keys: vec!["tls.crt".into(), "tls.key".into()],
            sidecar: SidecarUse::Mount {
                volume: TCP_TLS_VOLUME,
                dir: TCP_TLS_DIR,
            },
        });
    }
    refs
}

/// Whether `spec` references Secret `name` (same namespace): whether the reconciler checks it
/// and a missing one holds the gateway back.
pub fn references_secret(spec: &AgentGatewaySpec, name: &str) -> bool {
    secret_refs(spec).iter().any(|r| r.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> AgentGatewaySpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn every_secret_a_gateway_names_wakes_it() {
        let s = spec(
            "upstream:\n  kind: nats\n  url: tls://nats:4222\n  apiKeySecretRef: {name: key}\n  tls: {caSecretRef: {name: ca, key: ca.crt}, clientCertSecretRef: {name: client}}\n  nats: {credentialsSecretRef: {name: nats-user, key: user.creds}}\ntcpListener: {tokenSecretRef: {name: tcp-token, key: token}, tlsSecretRef: {name: tcp-tls}}\n",
        );
        for name in ["key", "ca", "client", "nats-user", "tcp-token", "tcp-tls"] {
            assert!(references_secret(&s, name), "{name}");
        }
        assert!(!references_secret(&s, "other"));
        let fields: Vec<_> = secret_refs(&s).iter().map(|r| r.field).collect();
        assert_eq!(
            fields,
            [
                "spec.upstream.apiKeySecretRef",
                "spec.upstream.tls.caSecretRef",
                "spec.upstream.tls.clientCertSecretRef",
                "spec.upstream.nats.credentialsSecretRef",
                "spec.tcpListener.tokenSecretRef",
                "spec.tcpListener.tlsSecretRef",
            ]
        );
    }

    #[test]
    fn the_nats_credentials_secret_wakes_its_gateway() {
        let s = spec(
            "upstream:\n  kind: nats\n  url: nats://nats:4222\n  apiKeySecretRef: {name: key}\n  nats: {credentialsSecretRef: {name: nats-user, key: user.creds}}\n",
        );
        assert!(references_secret(&s, "nats-user"));
    }
}
