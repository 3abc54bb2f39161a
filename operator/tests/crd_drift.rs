//! `crds/agentgateway.yaml` must match the Rust types.

#[test]
fn crd_yaml_matches_types() {
    let generated = nanogate_operator::crd_yaml().expect("CRD serialises");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/agentgateway.yaml");
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        generated == checked_in,
        "crds/agentgateway.yaml is out of date with the AgentGateway types.\n\
         Regenerate it with:\n    cargo run -p nanogate-operator --bin nanogate-operator -- crd > crds/agentgateway.yaml"
    );
}
