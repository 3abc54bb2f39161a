//! The contract between the AgentGateway CRD and nano-agent, walked from the CRD's own schema:
//! every field and every enum value the schema accepts (with the operator's validation on top)
//! produces an operator output that starts a real nano-agent.
//!
//! The variants are generated from the OpenAPI schema of `crds/agentgateway.yaml` (what
//! `nanogate-operator crd` prints from the Rust types), not from a list of fields: each
//! property with an `enum` is tried with every value, each boolean with `true` and `false`,
//! each number with its default, `minimum` and `maximum`, each optional object present with
//! only its required fields, each string with its default (or a sample). A variant the
//! operator's `validate` refuses never reaches a pod (the gateway is not Ready); every other
//! one goes the whole way a pod goes:
//!
//! 1. the reconciler's output: the ConfigMap (`build::sidecar_config` + `build::config_map`,
//!    with the hub's CA) for the gateway;
//! 2. the injector's output: the `nano-agent` container `inject()` adds to a pod (its env,
//!    its volume mounts: the ConfigMap, the gateway's Secrets, the projected token);
//! 3. a real `nano-agent` process with that environment and those files, which must answer
//!    `/readyz` with 200 (configuration loaded, upstream set up, socket and listeners bound)
//!    and exit 0 on SIGTERM.
//!
//! Liberties taken, each one where a kubelet would differ from a test: the pod's mount paths
//! are re-rooted in a temporary directory (in the env and in the config file's paths), the
//! admin server and the TCP listener get a free local port (flags, which win over the file),
//! and the hub address is a closed port (the agent keeps retrying it in the background).
//!
//! Cross-field rules of `validate` the generator cannot read from the schema are in
//! [`couple`]; every enum and boolean variant must pass validation, so a new rule that makes
//! the walk skip a value fails this test until `couple` knows it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use nanogate_operator::controller::build::{self, GatewayRef};
use nanogate_operator::crd::{AgentGateway, validate};
use nanogate_operator::gateway::SidecarImages;
use nanogate_operator::webhook::cluster::injection_config;
use nanogate_operator::webhook::inject::{Decision, InjectorSettings, inject};
use nanogate_tests::agent::agent_bin;
use serde_json::{Value, json};

/// A NATS user credentials file (JWT and NKey seed) from async-nats' own test configuration
/// (`tests/configs/TestUser.creds`): a well-formed `.creds` the agent can load.
const NATS_CREDS: &str = "-----BEGIN NATS USER JWT-----
eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiJMN1dBT1hJU0tPSUZNM1QyNEhMQ09ENzJRT1czQkNVWEdETjRKVU1SSUtHTlQ3RzdZVFRRIiwiaWF0IjoxNjUxNzkwOTgyLCJpc3MiOiJBRFRRUzdaQ0ZWSk5XNTcyNkdPWVhXNVRTQ1pGTklRU0hLMlpHWVVCQ0Q1RDc3T1ROTE9PS1pPWiIsIm5hbWUiOiJUZXN0VXNlciIsInN1YiI6IlVBRkhHNkZVRDJVVTRTREZWQUZVTDVMREZPMlhNNFdZTTc2VU5YVFBKWUpLN0VFTVlSQkhUMlZFIiwibmF0cyI6eyJwdWIiOnt9LCJzdWIiOnt9LCJzdWJzIjotMSwiZGF0YSI6LTEsInBheWxvYWQiOi0xLCJ0eXBlIjoidXNlciIsInZlcnNpb24iOjJ9fQ.bp2-Jsy33l4ayF7Ku1MNdJby4WiMKUrG-rSVYGBusAtV3xP4EdCa-zhSNUaBVIL3uYPPCQYCEoM1pCUdOnoJBg
------END NATS USER JWT------

-----BEGIN USER NKEY SEED-----
SUACH75SWCM5D2JMJM6EKLR2WDARVGZT4QC6LX3AGHSWOMVAKERABBBRWM
------END USER NKEY SEED------
";

/// Why a variant exists, which decides whether validation may refuse it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// An enum value or a boolean: the schema offers it as a choice, so it must work.
    Choice,
    /// A default, a sample, an optional object with its required fields only: must work.
    Plain,
    /// A schema bound (`minimum`/`maximum`): cross-field rules may refuse it.
    Bound,
}

/// One generated spec: the base spec with one property set.
#[derive(Clone, Debug)]
struct Variant {
    path: Vec<String>,
    value: Value,
    why: Why,
}

impl Variant {
    fn name(&self) -> String {
        format!("{} = {}", self.path.join("."), self.value)
    }
}

/// The `spec` schema of the CRD, as checked in.
fn spec_schema() -> Value {
    let yaml = nanogate_operator::crd_yaml().expect("CRD YAML");
    let crd: Value = serde_yaml::from_str(&yaml).expect("CRD parses");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

fn properties(schema: &Value) -> impl Iterator<Item = (&String, &Value)> {
    schema["properties"].as_object().into_iter().flatten()
}

fn is_required(parent: &Value, name: &str) -> bool {
    parent["required"]
        .as_array()
        .is_some_and(|r| r.iter().any(|n| n == name))
}

/// A value for a property the variant does not vary: its default, else a sample of its type
/// (a string is named after its path: unique Secret names per reference).
fn sample(schema: &Value, path: &[String]) -> Option<Value> {
    if let Some(d) = schema.get("default") {
        return Some(d.clone());
    }
    match schema["type"].as_str() {
        Some("object") => Some(required_object(schema, path)),
        Some("string") => Some(Value::from(path.join("-").to_lowercase())),
        Some("integer" | "number") => Some(schema.get("minimum").cloned().unwrap_or(json!(1))),
        Some("boolean") => Some(json!(false)),
        _ => None,
    }
}

/// An object of `schema` with its required properties only.
fn required_object(schema: &Value, path: &[String]) -> Value {
    let mut obj = serde_json::Map::new();
    for (name, prop) in properties(schema) {
        if is_required(schema, name) {
            let path = [path, std::slice::from_ref(name)].concat();
            if let Some(v) = sample(prop, &path) {
                obj.insert(name.clone(), v);
            }
        }
    }
    Value::Object(obj)
}

/// Every variant the schema under `path` offers; `skipped` gets what the walk cannot vary.
fn walk(schema: &Value, path: &[String], out: &mut Vec<Variant>, skipped: &mut Vec<String>) {
    for (name, prop) in properties(schema) {
        let path = [path, std::slice::from_ref(name)].concat();
        let mut push = |value: Value, why: Why| {
            out.push(Variant {
                path: path.clone(),
                value,
                why,
            })
        };
        if let Some(values) = prop["enum"].as_array() {
            for v in values {
                push(v.clone(), Why::Choice);
            }
            continue;
        }
        match prop["type"].as_str() {
            Some("object") if prop.get("properties").is_some() => {
                let optional = !is_required(schema, name) && prop.get("default").is_none();
                if optional {
                    push(required_object(prop, &path), Why::Plain);
                }
                walk(prop, &path, out, skipped);
            }
            Some("boolean") => {
                push(json!(true), Why::Choice);
                push(json!(false), Why::Choice);
            }
            Some("integer" | "number") => {
                let mut seen = BTreeSet::new();
                for (key, why) in [
                    ("default", Why::Plain),
                    ("minimum", Why::Bound),
                    ("maximum", Why::Bound),
                ] {
                    if let Some(v) = prop.get(key) {
                        // An integer property's bounds are integers in the schema's JSON.
                        let v = match (prop["type"].as_str(), v.as_f64()) {
                            (Some("integer"), Some(f)) => json!(f as i64),
                            _ => v.clone(),
                        };
                        if seen.insert(v.to_string()) {
                            push(v, why);
                        }
                    }
                }
            }
            _ => match sample(prop, &path) {
                Some(v) if !v.is_object() || prop.get("default").is_some() => push(v, Why::Plain),
                _ => skipped.push(path.join(".")),
            },
        }
    }
}

/// Sets `path` in `spec` to `value`, creating each missing object with its required fields.
fn set(spec: &mut Value, schema: &Value, path: &[String], value: Value) {
    let (mut at, mut sch) = (spec, schema);
    let mut walked = vec!["spec".to_string()];
    for (i, key) in path.iter().enumerate().skip(1) {
        sch = &sch["properties"][key];
        walked.push(key.clone());
        if i == path.len() - 1 {
            at[key] = value;
            return;
        }
        if at.get(key).is_none_or(Value::is_null) {
            at[key] = required_object(sch, &walked);
        }
        at = &mut at[key];
    }
}

/// The cross-field rules of `validate` the schema cannot express, applied so a variant is a
/// spec a user could apply: options of one transport select that transport, and each
/// transport gets a URL of its scheme (on a closed local port: nothing is contacted).
fn couple(spec: &mut Value) {
    let up = &mut spec["upstream"];
    let kind = if up.get("nats").is_some() {
        "nats"
    } else if up.get("socketio").is_some() {
        "socketio"
    } else {
        up["kind"].as_str().unwrap_or("http")
    }
    .to_string();
    up["kind"] = json!(kind);
    match kind.as_str() {
        "nats" => up["url"] = json!("nats://127.0.0.1:1"),
        "socketio" => up["url"] = json!("ws://127.0.0.1:1"),
        _ => {}
    }
}

/// A self-signed certificate and key (PEM) for `localhost`.
fn certificate() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
    (c.cert.pem(), c.key_pair.serialize_pem())
}

/// Files and values the cluster would hold: the Secrets the gateway references (contents
/// that suit each use) and the hub's CA.
struct Cluster {
    secrets: BTreeMap<String, BTreeMap<String, String>>,
    hub_ca: String,
}

impl Cluster {
    /// The Secrets of `spec`: every `…SecretRef` object in it (`name`, and `key` for one key;
    /// without `key` a `kubernetes.io/tls` Secret).
    fn for_spec(spec: &Value) -> Self {
        let (cert, key) = certificate();
        let mut secrets: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut refs = Vec::new();
        find_secret_refs(spec, &mut refs);
        for (field, r) in refs {
            let Some(name) = r["name"].as_str() else {
                continue;
            };
            let data = secrets.entry(name.to_string()).or_default();
            match r["key"].as_str() {
                Some(k) => {
                    let value = match field.as_str() {
                        "caSecretRef" => cert.clone(),
                        "credentialsSecretRef" => NATS_CREDS.into(),
                        _ => format!("secret-of-{field}"),
                    };
                    data.insert(k.to_string(), value);
                }
                None => {
                    data.insert("tls.crt".into(), cert.clone());
                    data.insert("tls.key".into(), key.clone());
                }
            }
        }
        Self {
            secrets,
            hub_ca: cert,
        }
    }
}

/// The `…SecretRef` objects under `value`, with their property names.
fn find_secret_refs(value: &Value, out: &mut Vec<(String, Value)>) {
    for (name, v) in value.as_object().into_iter().flatten() {
        if name.ends_with("SecretRef") {
            out.push((name.clone(), v.clone()));
        } else {
            find_secret_refs(v, out);
        }
    }
}

/// What a pod of gateway `gw` runs: the sidecar's environment and files, under `root`.
struct SidecarProcess {
    env: Vec<(String, String)>,
    /// File path → content.
    files: BTreeMap<PathBuf, String>,
    dirs: Vec<PathBuf>,
}

fn operator_output(gw: &AgentGateway, cluster: &Cluster, root: &Path) -> Result<SidecarProcess> {
    let cfg = build::sidecar_config(&gw.spec).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let gref = GatewayRef {
        name: "gw".into(),
        namespace: "apps".into(),
        uid: "uid-gw".into(),
    };
    let cm = build::with_hub_ca(build::config_map(&gref, &cfg), Some(&cluster.hub_ca));
    // The image policy is the operator's, not this contract's: allow the spec's image.
    let allowed: Vec<String> = gw.spec.sidecar.image.iter().cloned().collect();
    let images = SidecarImages::new(nanogate_operator::crd::DEFAULT_SIDECAR_IMAGE, &allowed)
        .map_err(anyhow::Error::msg)?;
    let settings = gw
        .injection_settings(&images)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let injection = injection_config(&settings, "127.0.0.1:1", false);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "app-1", "annotations": {"nanogate.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "app"}]}
    }))?;
    let Decision::Inject(patch) = inject(
        &pod,
        "apps",
        &BTreeMap::new(),
        std::slice::from_ref(&injection),
        &InjectorSettings::new("nanogate-system"),
    ) else {
        bail!("the pod was not injected");
    };
    let mut doc = serde_json::to_value(&pod)?;
    json_patch::patch(&mut doc, &patch.patch)?;
    let spec = &doc["spec"];
    let sidecar = ["initContainers", "containers"]
        .iter()
        .flat_map(|list| spec[list].as_array().into_iter().flatten())
        .find(|c| c["name"] == "nano-agent")
        .context("no nano-agent container")?;
    // `spec.sidecar.adminPort` and `logLevel` reach the agent's environment, and the probes and
    // the named container port follow the admin port (the agent itself gets a free port below).
    let env_value = |name: &str| {
        sidecar["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .map(str::to_string)
    };
    let port = gw.spec.sidecar.admin_port;
    anyhow::ensure!(
        env_value("NANOGATE_ADMIN_PORT") == Some(port.to_string()),
        "NANOGATE_ADMIN_PORT is not spec.sidecar.adminPort ({port}): {sidecar}"
    );
    anyhow::ensure!(
        env_value("NANOGATE_LOG_LEVEL").as_deref() == Some(gw.spec.sidecar.log_level.as_str()),
        "NANOGATE_LOG_LEVEL is not spec.sidecar.logLevel: {sidecar}"
    );
    anyhow::ensure!(
        sidecar["ports"][0]
            == json!({"name": "nanogate-admin", "containerPort": port, "protocol": "TCP"})
            && ["livenessProbe", "readinessProbe"]
                .iter()
                .all(|p| sidecar[p]["httpGet"]["port"] == json!(port)),
        "the admin container port or a probe is not on spec.sidecar.adminPort ({port}): {sidecar}"
    );
    let volumes: BTreeMap<&str, &Value> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();

    // Mount paths, longest first (a path under two mounts belongs to the deeper one).
    let mut mounts: Vec<(&str, &str)> = sidecar["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| Some((m["name"].as_str()?, m["mountPath"].as_str()?)))
        .collect();
    mounts.sort_by_key(|(_, p)| std::cmp::Reverse(p.len()));
    let reroot = |p: &str| root.join(p.trim_start_matches('/'));
    let under_mount = |v: &str| {
        mounts
            .iter()
            .any(|(_, m)| v == *m || v.starts_with(&format!("{}/", m.trim_end_matches('/'))))
    };

    let mut files = BTreeMap::new();
    let mut dirs = Vec::new();
    let cm_data = cm.data.clone().unwrap_or_default();
    for (name, path) in &mounts {
        let volume = volumes.get(name).context("mount without volume")?;
        let dir = reroot(path);
        dirs.push(dir.clone());
        // `items` (key → file name) limit and rename keys; without them every key is a file.
        let keyed = |data: &BTreeMap<String, String>, items: &Value| -> Vec<(PathBuf, String)> {
            match items.as_array() {
                Some(items) => items
                    .iter()
                    .filter_map(|i| {
                        let v = data.get(i["key"].as_str()?)?;
                        Some((dir.join(i["path"].as_str()?), v.clone()))
                    })
                    .collect(),
                None => data.iter().map(|(k, v)| (dir.join(k), v.clone())).collect(),
            }
        };
        if let Some(c) = volume.get("configMap") {
            anyhow::ensure!(c["name"] == "gw-agent-config", "unknown ConfigMap {c}");
            files.extend(keyed(&cm_data, &c["items"]));
        } else if let Some(s) = volume.get("secret") {
            let name = s["secretName"].as_str().unwrap_or_default();
            let data = cluster.secrets.get(name).context("Secret not referenced")?;
            files.extend(keyed(data, &s["items"]));
        } else if let Some(p) = volume.get("projected") {
            for source in p["sources"].as_array().into_iter().flatten() {
                if let Some(path) = source["serviceAccountToken"]["path"].as_str() {
                    files.insert(dir.join(path), "projected-service-account-token".into());
                }
            }
        } else if volume.get("emptyDir").is_none() {
            bail!("volume kind not handled: {volume}");
        }
    }
    // The config file's paths point into the pod's mounts: re-rooted like the mounts.
    let config_file = reroot(&format!("{}/{}", build::CONFIG_DIR, build::CONFIG_KEY));
    let text = files.get(&config_file).context("config file not mounted")?;
    let mut text = text.clone();
    for (_, m) in &mounts {
        let m = m.trim_end_matches('/');
        text = text.replace(&format!("\"{m}/"), &format!("\"{}/", reroot(m).display()));
    }
    files.insert(config_file, text);

    let mut env = Vec::new();
    for e in sidecar["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            if under_mount(v) {
                reroot(v).display().to_string()
            } else {
                v.to_string()
            }
        } else if let Some(r) = e["valueFrom"].get("secretKeyRef") {
            let (n, k) = (r["name"].as_str(), r["key"].as_str());
            cluster
                .secrets
                .get(n.unwrap_or_default())
                .and_then(|d| d.get(k.unwrap_or_default()))
                .with_context(|| format!("env {name}: Secret key not referenced"))?
                .clone()
        } else if let Some(f) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match f {
                "metadata.name" => "app-1".into(),
                "metadata.namespace" => "apps".into(),
                "metadata.uid" => "uid-app-1".into(),
                other => bail!("env {name}: fieldRef {other} not handled"),
            }
        } else {
            bail!("env {name}: source not handled: {e}");
        };
        env.push((name, value));
    }
    Ok(SidecarProcess { env, files, dirs })
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Starts nano-agent as the pod would, waits for `/readyz` 200, stops it with SIGTERM.
fn start_and_stop(process: &SidecarProcess, root: &Path, tcp: bool) -> Result<()> {
    for d in &process.dirs {
        std::fs::create_dir_all(d)?;
    }
    for (path, content) in &process.files {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, content)?;
    }
    let log = root.join("agent.log");
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new(agent_bin());
    cmd.env_clear()
        .envs(process.env.iter().map(|(k, v)| (k, v)))
        .arg("--admin-listen")
        .arg(admin.to_string())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::options().append(true).open(&log)?);
    if tcp {
        cmd.arg("--tcp-listen")
            .arg(format!("0.0.0.0:{}", free_port()));
    }
    let mut child = cmd.spawn().context("starting nano-agent")?;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("nano-agent exited with {status}; log:\n{}", log_text());
        }
        if nanogate_tests::http::http_get(admin, "/readyz", Duration::from_secs(2))
            .is_ok_and(|(code, _)| code == 200)
        {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("nano-agent not ready after 20s; log:\n{}", log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "nano-agent still running 20s after SIGTERM; log:\n{}",
                log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    anyhow::ensure!(
        status.success(),
        "nano-agent exited with {status} after SIGTERM; log:\n{}",
        log_text()
    );
    Ok(())
}

#[test]
fn every_spec_the_crd_accepts_starts_a_real_agent() {
    let schema = spec_schema();
    let mut variants = Vec::new();
    let mut skipped = Vec::new();
    walk(&schema, &["spec".to_string()], &mut variants, &mut skipped);
    // The walk reaches the settings that once passed the CRD and stopped every agent.
    for wanted in [
        "spec.delivery.overflowPolicy = \"dropOldest\"",
        "spec.upstream.tls.insecureSkipVerify = true",
    ] {
        assert!(
            variants.iter().any(|v| v.name() == wanted),
            "the walk misses {wanted}"
        );
    }
    let base = required_object(&schema, &["spec".to_string()]);

    let mut refused = Vec::new();
    let mut failures = Vec::new();
    let mut started: BTreeMap<String, String> = BTreeMap::new();
    for variant in &variants {
        let mut spec = base.clone();
        set(&mut spec, &schema, &variant.path, variant.value.clone());
        couple(&mut spec);
        let gw: AgentGateway = match serde_json::from_value(json!({
            "apiVersion": "nanogate.io/v1alpha1",
            "kind": "AgentGateway",
            "metadata": {"name": "gw", "namespace": "apps", "uid": "uid-gw", "generation": 1},
            "spec": spec,
        })) {
            Ok(gw) => gw,
            Err(e) => {
                failures.push(format!(
                    "{}: the operator cannot read it: {e}",
                    variant.name()
                ));
                continue;
            }
        };
        if let Err(errors) = validate(&gw.spec) {
            let msg = nanogate_operator::crd::join_errors(&errors);
            if variant.why == Why::Bound {
                refused.push(format!("{}: {msg}", variant.name()));
            } else {
                failures.push(format!(
                    "{}: refused by validate ({msg}); teach `couple` the rule",
                    variant.name()
                ));
            }
            continue;
        }
        let dir = tempfile::Builder::new()
            .prefix("ng")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let cluster = Cluster::for_spec(&serde_json::to_value(&gw.spec).expect("spec"));
        let outcome = operator_output(&gw, &cluster, dir.path()).and_then(|process| {
            // The same file and environment as a variant already started: nothing new to run.
            let key = format!(
                "{:?}{:?}",
                process.files.values().collect::<Vec<_>>(),
                process.env
            )
            .replace(&dir.path().display().to_string(), "");
            if let Some(same) = started.get(&key) {
                eprintln!("{}: same sidecar as {same}", variant.name());
                return Ok(());
            }
            start_and_stop(&process, dir.path(), gw.spec.tcp_listener.is_some())?;
            started.insert(key, variant.name());
            Ok(())
        });
        match outcome {
            Ok(()) => eprintln!("ok: {}", variant.name()),
            Err(e) => failures.push(format!("{}: {e:#}", variant.name())),
        }
    }
    eprintln!(
        "{} variants, {} agents started, {} refused by validation (schema bounds):\n  {}\nnot varied: {}",
        variants.len(),
        started.len(),
        refused.len(),
        refused.join("\n  "),
        skipped.join(", ")
    );
    assert!(
        failures.is_empty(),
        "{} of {} variants the CRD accepts do not start a nano-agent:\n\n{}",
        failures.len(),
        variants.len(),
        failures.join("\n\n")
    );
    assert!(
        started.len() >= 30,
        "the walk started {} agents",
        started.len()
    );
}
