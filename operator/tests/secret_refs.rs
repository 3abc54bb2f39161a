//! Every Secret a gateway names is one the reconciler checks (a missing one holds the gateway
//! back until it appears), whichever field names it.

use nanogate_operator::crd::AgentGateway;
use nanogate_operator::gateway::refs::references_secret;

fn fixture(name: &str) -> AgentGateway {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_secret_of_the_full_fixture_wakes_the_gateway() {
    let gw = fixture("full.yaml");
    // API key, CA, client certificate and the NATS credentials file.
    for name in ["nats-creds", "nats-ca", "nats-client", "nats-user"] {
        assert!(references_secret(&gw.spec, name), "Secret {name}");
    }
    assert!(!references_secret(&gw.spec, "unrelated"));
}

#[test]
fn the_tcp_listener_secrets_wake_the_gateway() {
    let mut gw = fixture("minimal.yaml");
    gw.spec.tcp_listener = Some(
        serde_json::from_str(
            r#"{"tokenSecretRef": {"name": "tcp-token"}, "tlsSecretRef": {"name": "tcp-tls"}}"#,
        )
        .unwrap(),
    );
    for name in ["tcp-token", "tcp-tls"] {
        assert!(references_secret(&gw.spec, name), "Secret {name}");
    }
}
