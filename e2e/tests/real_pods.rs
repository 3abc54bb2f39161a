//! Injected pods on the real node (issue 16): what only a kubelet and a container runtime show.
//! The stack is `make demo`'s (`nanogate_e2e::local_operator`): the images the shipping test
//! builds, imported into the node; the operator as a local process with its hub on the bridge;
//! a platform receiver on this machine per test; one namespace and one gateway (the example
//! `examples/k8s/agentgateway.yaml`) per test. Every status read here is the kubelet's.
//!
//! - socket access for any app identity: the app as 10001 without `fsGroup`, with
//!   `runAsGroup`, with a user-set `fsGroup` publishes through the socket, the pod's
//!   `securityContext` as the user wrote it;
//! - a Job whose app exits completes, and the legacy sidecar exits 0 on its own;
//! - the app container starts only once the socket accepts (postStart `wait-ready`), and the
//!   pod is not Ready while the agent is held; the same pod without the hook shows the failure;
//! - `kill -9` of nano-agent: the kubelet restarts it, the app reconnects, the platform gets
//!   every counter the app was told was accepted, including those spooled before the kill;
//! - pod deletion with the platform down: the messages left behind are counted on the gateway
//!   (`status.leftBehind`, the LEFT-BEHIND column, a `MessagesLeftBehind` event) and logged;
//! - `kubectl exec` into the app container publishes with the shell example.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use nanogate_e2e::images::{Images, images};
use nanogate_e2e::local_operator::{
    apply_in_namespace, example_gateway_yaml, wait_gateway_ready, wait_sidecars_connected,
};
use nanogate_e2e::node::{BUSYBOX_IMAGE, HOST_IP};
use nanogate_e2e::{
    ControlPlane, LocalOperator, Node, TestNamespace, pod_ready, progress, wait_for,
};
use nanogate_tests::platform::PlatformServer;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

const API_KEY: &str = "real-pods-api-key";
const POD_TIMEOUT: Duration = Duration::from_secs(120);
/// The sidecar and app containers' names.
const AGENT: &str = "nano-agent";
const APP: &str = "app";
/// The socket directory of the default gateway (`TENDRL_SOCKET_PATH`'s directory).
const SOCKET_DIR: &str = "/var/lib/tendrl";
/// A nano-agent image that waits for `<socket dir>/release` before it starts the agent.
const HELD_AGENT_IMAGE: &str = "localhost/nanogate-e2e/nano-agent-held:1";

/// What every test shares: the node, the images in it, the operator.
struct Stack {
    cp: &'static ControlPlane,
    node: &'static Node,
    images: &'static Images,
    operator: LocalOperator,
}

static STACK: OnceCell<Stack> = OnceCell::const_new();

async fn stack() -> Result<&'static Stack> {
    STACK
        .get_or_try_init(|| async {
            let started = Instant::now();
            let node = Node::shared().await?;
            let cp = ControlPlane::shared().await?;
            let images = tokio::task::spawn_blocking(images).await??;
            node.import_image(images.reference(AGENT))?;
            node.import_image(&images.app)?;
            let operator =
                LocalOperator::install(cp, &nanogate_e2e::workspace_binary("nanogate-operator")?)
                    .await?;
            progress!(
                "[real-pods] node, images and operator ready in {:.1}s (operator log {})",
                started.elapsed().as_secs_f64(),
                operator.log().display()
            );
            Ok(Stack {
                cp,
                node,
                images,
                operator,
            })
        })
        .await
}

/// One test's namespace, platform and gateway `shop`.
struct Setup {
    stack: &'static Stack,
    client: kube::Client,
    ns: TestNamespace,
    platform: PlatformServer,
}

impl Setup {
    fn ns(&self) -> &str {
        self.ns.name()
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), self.ns())
    }

    /// `kubectl -n <ns> <args>`.
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.ns()];
        all.extend_from_slice(args);
        self.stack.cp.kubectl(&all)
    }

    fn app_log(&self, pod: &str) -> Result<String> {
        self.kubectl(&["logs", pod, "-c", APP])
    }

    /// What the platform received from pod `host` (the example app puts its hostname in).
    fn received_from(&self, host: &str) -> Vec<Value> {
        self.platform
            .received()
            .into_iter()
            .filter(|m| m["data"]["host"] == host)
            .collect()
    }

    /// The counters of [`Setup::received_from`].
    fn counters_from(&self, host: &str) -> Vec<u64> {
        self.received_from(host)
            .iter()
            .filter_map(|m| m["data"]["counter"].as_u64())
            .collect()
    }

    /// Creates `pod` once the webhook injects it and waits until it is Ready.
    async fn run_ready(&self, pod: Value) -> Result<Pod> {
        let name = pod["metadata"]["name"]
            .as_str()
            .context("pod name")?
            .to_string();
        nanogate_e2e::create_injected(&self.client, self.ns(), serde_json::from_value(pod)?)
            .await?;
        self.wait_pod(&name, "Ready", |pod| pod_ready(pod).then(|| pod.clone()))
            .await
    }

    /// Waits until `probe` returns `Some` for pod `name`; the error shows the pod and events.
    async fn wait_pod<T>(
        &self,
        name: &str,
        what: &str,
        probe: impl Fn(&Pod) -> Option<T>,
    ) -> Result<T> {
        let pods = self.pods();
        let probe = &probe;
        let pods = &pods;
        wait_for(&format!("pod {name}: {what}"), POD_TIMEOUT, || async move {
            Ok(pods.get_opt(name).await?.as_ref().and_then(probe))
        })
        .await
        .map_err(|e| e.context(self.diagnostics()))
    }

    fn diagnostics(&self) -> String {
        let pods = self
            .kubectl(&["get", "pods", "-o", "wide"])
            .unwrap_or_default();
        let events = self
            .kubectl(&["get", "events", "--sort-by=.lastTimestamp"])
            .unwrap_or_default();
        format!(
            "pods:\n{pods}\nevents:\n{events}\noperator log:\n{}",
            self.stack.operator.log_tail(10)
        )
    }
}

/// A namespace, a platform receiver on the bridge and the example gateway pointing at it;
/// `sidecar_image` replaces the gateway's default nano-agent image.
async fn setup(prefix: &str, sidecar_image: Option<&str>) -> Result<Setup> {
    let stack = stack().await?;
    stack.operator.ensure_running()?;
    let client = stack.cp.client().await?;
    let ns = TestNamespace::create(&client, prefix).await?;
    let platform = PlatformServer::start_on(&format!("{HOST_IP}:0"), API_KEY).await?;
    let mut gateway = example_gateway_yaml(&platform.url(), API_KEY)?;
    if let Some(image) = sidecar_image {
        let sidecar = "\n  sidecar:\n";
        ensure!(gateway.contains(sidecar), "no sidecar section in {gateway}");
        gateway = gateway.replace(sidecar, &format!("{sidecar}    image: {image}\n"));
    }
    apply_in_namespace(stack.cp, ns.name(), &gateway)?;
    wait_gateway_ready(&client, ns.name(), "shop").await?;
    Ok(Setup {
        stack,
        client,
        ns,
        platform,
    })
}

/// An annotated pod running the example app image (`publish-loop.sh`, one message a second)
/// with the pod-level `security` context; `app` is merged into the app container.
fn app_pod(stack: &Stack, name: &str, security: Value, app: Value) -> Value {
    let mut container = json!({
        "name": APP,
        "image": stack.images.app,
        "imagePullPolicy": "Never",
        "env": [{"name": "PUBLISH_INTERVAL", "value": "1"}],
        "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
    });
    if let (Some(c), Some(extra)) = (container.as_object_mut(), app.as_object()) {
        c.extend(extra.clone());
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": {"nanogate.io/inject": "true"}},
        "spec": {
            "terminationGracePeriodSeconds": 30,
            "securityContext": security,
            "containers": [container],
        }
    })
}

/// The restricted pod context of `examples/k8s/deployment.yaml` plus `extra`.
fn restricted(extra: Value) -> Value {
    let mut security = json!({
        "runAsNonRoot": true,
        "runAsUser": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    });
    if let (Some(s), Some(extra)) = (security.as_object_mut(), extra.as_object()) {
        s.extend(extra.clone());
    }
    security
}

fn statuses(pod: &Pod) -> Vec<ContainerStatus> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default()
}

fn status_of(pod: &Pod, container: &str) -> Option<ContainerStatus> {
    statuses(pod).into_iter().find(|c| c.name == container)
}

/// The counters `publish-loop.sh` logged as accepted (`published counter=N (accepted)`).
fn accepted_counters(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("publish-loop: published counter="))
        .filter_map(|rest| rest.strip_suffix(" (accepted)"))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Both containers of an injected pod run under the kubelet: containerd ids, ready, never
/// restarted.
fn assert_two_running(pod: &Pod) {
    let containers = statuses(pod);
    assert_eq!(containers.len(), 2, "{containers:?}");
    for c in &containers {
        assert!(c.ready, "{c:?}");
        assert_eq!(c.restart_count, 0, "{c:?}");
        assert!(
            c.state.as_ref().and_then(|s| s.running.as_ref()).is_some(),
            "{c:?}"
        );
        let id = c.container_id.as_deref().unwrap_or_default();
        assert!(id.starts_with("containerd://"), "{c:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Socket access for any app identity

/// Runs the example app with pod context `security`, checks the stored context is the user's
/// (the injector added no group), that `id` in the app container matches `id_has`, and that
/// the platform receives what the app publishes through the socket.
async fn app_publishes_as(prefix: &str, security: Value, id_has: &[&str]) -> Result<()> {
    let s = setup(prefix, None).await?;
    let started = Instant::now();
    let pod = s
        .run_ready(app_pod(s.stack, "app", security.clone(), json!({})))
        .await?;
    assert_two_running(&pod);
    let stored = serde_json::to_value(
        pod.spec
            .as_ref()
            .and_then(|s| s.security_context.clone())
            .unwrap_or_default(),
    )?;
    assert_eq!(stored, security, "the pod's securityContext is the user's");
    let sidecar = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .context("containers")?;
    assert_eq!(sidecar.name, AGENT, "legacy mode: the sidecar goes first");

    let id = s.kubectl(&["exec", "app", "-c", APP, "--", "id"])?;
    for want in id_has {
        assert!(id.contains(want), "`id` in the app container: {id}");
    }
    let socket = s.kubectl(&["exec", "app", "-c", APP, "--", "ls", "-ln", SOCKET_DIR])?;

    let got = wait_for(
        "the platform to receive 2 messages from the app",
        Duration::from_secs(60),
        || {
            let got = s.received_from("app");
            async move { Ok((got.len() >= 2).then_some(got)) }
        },
    )
    .await
    .map_err(|e| e.context(s.app_log("app").unwrap_or_default()))?;
    for m in &got {
        assert_eq!(m["data"]["uid"], 10001, "{m}");
    }
    let log = s.app_log("app")?;
    assert!(
        !log.contains("not published"),
        "the app never failed to publish: {log}"
    );
    progress!(
        "[real-pods] {prefix}: `{}` published through the socket; {} at the platform {:.1}s after the pod was created; {SOCKET_DIR}: {}",
        id.trim(),
        got.len(),
        started.elapsed().as_secs_f64(),
        socket
            .lines()
            .filter(|l| l.contains(".sock"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_as_10001_without_fs_group_publishes() -> Result<()> {
    // No runAsGroup, no fsGroup: the runtime gives the process gid 0 (the image's passwd
    // does not know 10001), and no group in common with the sidecar's 65532.
    app_publishes_as("uid-only", restricted(json!({})), &["uid=10001"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_with_run_as_group_publishes() -> Result<()> {
    app_publishes_as(
        "run-as-group",
        restricted(json!({"runAsGroup": 20002})),
        &["uid=10001", "gid=20002"],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_with_a_user_set_fs_group_publishes() -> Result<()> {
    app_publishes_as(
        "fs-group",
        restricted(json!({"runAsGroup": 20002, "fsGroup": 30003})),
        &["uid=10001", "gid=20002", "30003"],
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Run to completion

/// A Job whose app publishes once and exits: the Job completes; the legacy sidecar, told by
/// the hub that its app is done, delivers and exits 0 by itself (the kubelet's statuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_completes_and_its_sidecar_exits_zero() -> Result<()> {
    let s = setup("job", None).await?;
    let script = r#"sh /usr/local/bin/nanogate.sh publish "{\"job\":\"$HOSTNAME\"}" && echo "job: published""#;
    let mut template = app_pod(
        s.stack,
        "report",
        restricted(json!({})),
        json!({"command": ["sh", "-c", script]}),
    );
    template["spec"]["restartPolicy"] = json!("Never");
    // The webhook knows the gateway before the Job's pod is created.
    nanogate_e2e::wait_for_injection(
        &s.client,
        s.ns(),
        &serde_json::from_value(template.clone())?,
    )
    .await?;
    let job: Job = serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "report"},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": template["metadata"].clone(),
            "spec": template["spec"].clone(),
        }}
    }))?;
    let started = Instant::now();
    let jobs: Api<Job> = Api::namespaced(s.client.clone(), s.ns());
    jobs.create(&PostParams::default(), &job).await?;
    let jobs = &jobs;
    wait_for("job report Complete", POD_TIMEOUT, || async move {
        let job = jobs.get("report").await?;
        let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
        ensure!(
            !conditions
                .iter()
                .any(|c| c.type_ == "Failed" && c.status == "True"),
            "job report failed: {conditions:?}"
        );
        Ok(conditions
            .iter()
            .any(|c| c.type_ == "Complete" && c.status == "True")
            .then_some(()))
    })
    .await
    .map_err(|e| e.context(s.diagnostics()))?;
    let took = started.elapsed();

    let list = s
        .pods()
        .list(&ListParams::default().labels("job-name=report"))
        .await?;
    ensure!(list.items.len() == 1, "{} pods", list.items.len());
    let pod = &list.items[0];
    let name = pod.metadata.name.clone().unwrap_or_default();
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded")
    );
    let mut finished = Vec::new();
    for container in [AGENT, APP] {
        let status = status_of(pod, container).context(container)?;
        assert_eq!(status.restart_count, 0, "{status:?}");
        let terminated = status
            .state
            .and_then(|s| s.terminated)
            .with_context(|| format!("{container} has not terminated"))?;
        assert_eq!(terminated.exit_code, 0, "{container}: {terminated:?}");
        assert_eq!(terminated.reason.as_deref(), Some("Completed"));
        let at = terminated.finished_at.context("finishedAt")?.0.as_second();
        finished.push(at);
    }
    let agent_log = s.kubectl(&["logs", &name, "-c", AGENT])?;
    assert!(
        agent_log.contains("drain requested by the hub"),
        "the hub drained it: {agent_log}"
    );
    assert!(
        agent_log.contains("nothing left behind"),
        "it delivered before exiting: {agent_log}"
    );
    let got = s.platform.received();
    assert!(
        got.iter().any(|m| m["data"]["job"] == name.as_str()),
        "the platform has the Job's message: {got:?}"
    );
    progress!(
        "[real-pods] job: Complete in {:.1}s; app exited 0, nano-agent exited 0 {}s later",
        took.as_secs_f64(),
        finished[0] - finished[1]
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Start-up gating

/// Builds [`HELD_AGENT_IMAGE`] (the nano-agent image plus busybox, starting the agent once
/// `<socket dir>/release` exists) and imports it into the node.
fn held_agent_image(stack: &Stack) -> Result<()> {
    let dir = stack
        .cp
        .dir()
        .join(format!("held-agent-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    let hold = "echo \"held: starting nano-agent once $0 exists\"; until [ -e \"$0\" ]; do /bin/busybox sleep 0.2; done; exec /usr/local/bin/nano-agent";
    let containerfile = format!(
        "FROM {agent}\nCOPY --from={BUSYBOX_IMAGE} /bin/busybox /bin/busybox\nENTRYPOINT {entrypoint}\n",
        agent = stack.images.reference(AGENT),
        entrypoint = json!([
            "/bin/busybox",
            "sh",
            "-c",
            hold,
            format!("{SOCKET_DIR}/release")
        ]),
    );
    std::fs::write(dir.join("Containerfile"), containerfile)?;
    let dir_arg = dir.display().to_string();
    nanogate_e2e::podman::podman_ok(&[
        "build",
        "--pull=never",
        "--network=none",
        "-q",
        "-t",
        HELD_AGENT_IMAGE,
        &dir_arg,
    ])?;
    let _ = std::fs::remove_dir_all(&dir);
    stack.node.import_image(HELD_AGENT_IMAGE)
}

/// One look at the pods while their agents are held: `Some(Err(…))` if the gated pod is Ready
/// or its app container exists (`kubectl exec` reaches it, or the kubelet reports it running);
/// `Some(Ok(log))` once the ungated app logged a failed publish and 3 s have passed.
fn held_sample(s: &Setup, held_since: Instant) -> Result<Option<Result<String>>> {
    let pod: Pod = serde_json::from_str(&s.kubectl(&["get", "pod", "gated", "-o", "json"])?)?;
    let app_running = status_of(&pod, APP)
        .and_then(|c| c.state)
        .and_then(|s| s.running)
        .is_some();
    let violation = if pod_ready(&pod) {
        Some("gated is Ready while its agent is held")
    } else if app_running {
        Some("the kubelet reports gated's app running while its agent is held")
    } else if s
        .kubectl(&["exec", "gated", "-c", APP, "--", "true"])
        .is_ok()
    {
        Some("kubectl exec reached gated's app while its agent is held")
    } else {
        None
    };
    if let Some(violation) = violation {
        return Ok(Some(Err(anyhow::anyhow!(
            "{violation}: {}",
            s.diagnostics()
        ))));
    }
    let log = s.app_log("ungated").unwrap_or_default();
    Ok(
        (log.contains("not published") && held_since.elapsed() >= Duration::from_secs(3))
            .then_some(Ok(log)),
    )
}

/// The app container starts only once nano-agent's socket accepts, and the pod is not Ready
/// before: the agent is held (an image that waits for a file before it starts nano-agent), so
/// for as long as the test likes the agent container runs without a socket. The injected pod
/// (postStart `nano-agent wait-ready`) keeps its app from starting; the same pod without the
/// hook — created from the injected spec, opted out of injection — starts its app at once,
/// which fails to publish: what the first pod's "published with no retry" rules out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_starts_only_once_the_socket_accepts() -> Result<()> {
    let stack = stack().await?;
    tokio::task::spawn_blocking(move || held_agent_image(stack)).await??;
    let s = setup("gated", Some(HELD_AGENT_IMAGE)).await?;
    let gated = app_pod(stack, "gated", restricted(json!({})), json!({}));
    nanogate_e2e::create_injected(&s.client, s.ns(), serde_json::from_value(gated.clone())?)
        .await?;

    // The control: the injected spec without the hook, not injected again.
    let mut ungated = gated;
    ungated["metadata"]["name"] = json!("ungated");
    let dry = s
        .pods()
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &serde_json::from_value(ungated.clone())?,
        )
        .await?;
    let mut spec = serde_json::to_value(dry.spec.context("spec")?)?;
    let containers = spec["containers"].as_array_mut().context("containers")?;
    let agent = containers
        .iter_mut()
        .find(|c| c["name"] == AGENT)
        .context("the dry run was not injected")?;
    ensure!(
        agent["lifecycle"]["postStart"]["exec"]["command"][1] == "wait-ready",
        "{agent}"
    );
    agent
        .as_object_mut()
        .context("container")?
        .remove("lifecycle");
    ungated["metadata"]["annotations"] = json!({"nanogate.io/inject": "false"});
    ungated["spec"] = spec;
    s.pods()
        .create(&PostParams::default(), &serde_json::from_value(ungated)?)
        .await?;

    // Both agents run, held, without a socket.
    for pod in ["gated", "ungated"] {
        wait_for(
            &format!("{pod}: the held agent running"),
            POD_TIMEOUT,
            || {
                let running = s
                    .kubectl(&["exec", pod, "-c", AGENT, "--", "/bin/busybox", "true"])
                    .ok();
                async move { Ok(running) }
            },
        )
        .await
        .map_err(|e| e.context(s.diagnostics()))?;
    }
    let held_since = Instant::now();
    // The control's app runs and fails to publish; meanwhile, and for at least 3 s, the
    // gated pod's app container does not exist and the pod is not Ready.
    let mut samples = 0;
    let control_log = wait_for(
        "the ungated app to fail to publish",
        Duration::from_secs(60),
        || {
            samples += 1;
            let sample = held_sample(&s, held_since);
            async move { sample }
        },
    )
    .await??;
    assert!(accepted_counters(&control_log).is_empty(), "{control_log}");

    // Release both agents.
    let released = std::time::SystemTime::now();
    for pod in ["gated", "ungated"] {
        s.kubectl(&[
            "exec",
            pod,
            "-c",
            AGENT,
            "--",
            "/bin/busybox",
            "touch",
            &format!("{SOCKET_DIR}/release"),
        ])?;
    }
    let released_at = released.duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let pod = s
        .wait_pod("gated", "Ready", |pod| pod_ready(pod).then(|| pod.clone()))
        .await?;
    let ready_after = held_since.elapsed();
    let app_started = status_of(&pod, APP)
        .and_then(|c| c.state)
        .and_then(|s| s.running)
        .and_then(|r| r.started_at)
        .context("gated's app is not running")?
        .0
        .as_second();
    assert!(
        app_started >= i64::try_from(released_at)?,
        "the app started at {app_started}, before the agent was released at {released_at}"
    );
    let log = wait_for("gated's first publish", Duration::from_secs(30), || {
        let log = s.app_log("gated").unwrap_or_default();
        async move { Ok(log.contains("published counter=").then_some(log)) }
    })
    .await?;
    let first = log
        .lines()
        .find(|l| l.contains("counter=1"))
        .unwrap_or_default();
    assert_eq!(
        first, "publish-loop: published counter=1 (accepted)",
        "the app's first publish succeeded: {log}"
    );
    assert!(!log.contains("not published"), "{log}");
    // The control recovers by retrying.
    wait_for(
        "the ungated app to publish",
        Duration::from_secs(30),
        || {
            let log = s.app_log("ungated").unwrap_or_default();
            async move { Ok((!accepted_counters(&log).is_empty()).then_some(())) }
        },
    )
    .await?;
    progress!(
        "[real-pods] gated: held {:.1}s ({samples} samples: not Ready, no app container), Ready {:.1}s after the hold began; its app's first publish accepted; without the hook the app failed {} times first",
        ready_after.as_secs_f64(),
        ready_after.as_secs_f64(),
        control_log.matches("not published").count()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sidecar restart

/// pid on this machine of the (main process of the) container `container_id` (containerd).
fn host_pid(node: &Node, container_id: &str) -> Result<i32> {
    let id = container_id
        .strip_prefix("containerd://")
        .unwrap_or(container_id);
    let tasks = node.ctr(&["tasks", "ls"])?;
    tasks
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(id))
                .then(|| words.next().and_then(|p| p.parse().ok()))
                .flatten()
        })
        .with_context(|| format!("no task {id} in `ctr tasks ls`:\n{tasks}"))
}

/// `kill -9` of nano-agent while the platform is down (so some accepted messages wait in its
/// spool): the kubelet restarts the container (restartCount 1), the app retries, reconnects
/// and goes on; the platform receives every counter the app logged as accepted, the spooled
/// ones included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidecar_restarts_and_no_accepted_message_is_lost() -> Result<()> {
    let s = setup("restart", None).await?;
    let pod = s
        .run_ready(app_pod(s.stack, "steady", restricted(json!({})), json!({})))
        .await?;
    assert_two_running(&pod);
    wait_for("3 messages delivered", Duration::from_secs(60), || {
        let n = s.counters_from("steady").len();
        async move { Ok((n >= 3).then_some(())) }
    })
    .await?;

    // The platform goes down: what the app publishes now is accepted into the spool only.
    s.platform.faults().set_down(true);
    let before = accepted_counters(&s.app_log("steady")?).into_iter().max();
    let before = before.context("nothing accepted")?;
    wait_for("3 more accepted", Duration::from_secs(30), || {
        let log = s.app_log("steady").unwrap_or_default();
        async move {
            Ok(accepted_counters(&log)
                .into_iter()
                .max()
                .filter(|n| *n >= before + 3)
                .map(|_| ()))
        }
    })
    .await?;

    let agent = status_of(&pod, AGENT).context("agent status")?;
    let pid = host_pid(
        s.stack.node,
        agent.container_id.as_deref().unwrap_or_default(),
    )?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    ensure!(
        String::from_utf8_lossy(&cmdline).contains("nano-agent"),
        "pid {pid} is not nano-agent: {}",
        String::from_utf8_lossy(&cmdline)
    );
    let spooled: BTreeSet<u64> = accepted_counters(&s.app_log("steady")?)
        .into_iter()
        .collect::<BTreeSet<_>>()
        .difference(&s.counters_from("steady").into_iter().collect())
        .copied()
        .collect();
    ensure!(spooled.len() >= 3, "accepted, undelivered: {spooled:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let killed = Instant::now();
    let pod = s
        .wait_pod("steady", "nano-agent restarted and Ready", |pod| {
            let agent = status_of(pod, AGENT)?;
            (agent.restart_count == 1 && agent.ready && pod_ready(pod)).then(|| pod.clone())
        })
        .await?;
    let restarted = killed.elapsed();
    let agent = status_of(&pod, AGENT).context("agent status")?;
    let last = agent
        .last_state
        .and_then(|s| s.terminated)
        .context("no last state")?;
    assert_eq!(last.exit_code, 137, "killed by SIGKILL: {last:?}");
    assert_eq!(status_of(&pod, APP).map(|c| c.restart_count), Some(0));
    s.platform.faults().set_down(false);

    // The app goes on; the platform gets every accepted counter.
    let accepted_after = wait_for("5 more accepted", Duration::from_secs(60), || {
        let log = s.app_log("steady").unwrap_or_default();
        async move {
            let accepted = accepted_counters(&log);
            let done = accepted.iter().max().is_some_and(|n| *n >= before + 8);
            Ok(done.then_some(accepted))
        }
    })
    .await?;
    let expected: BTreeSet<u64> = accepted_after.iter().copied().collect();
    assert_eq!(
        expected,
        (1..=*expected.last().context("accepted")?).collect(),
        "the app's counters are consecutive"
    );
    let missing = wait_for(
        "every accepted counter at the platform",
        Duration::from_secs(60),
        || {
            let got: BTreeSet<u64> = s.counters_from("steady").into_iter().collect();
            let missing: Vec<u64> = expected.difference(&got).copied().collect();
            async move { Ok(missing.is_empty().then_some(())) }
        },
    )
    .await;
    let got = s.counters_from("steady");
    missing.map_err(|e| {
        let have: BTreeSet<u64> = got.iter().copied().collect();
        e.context(format!(
            "missing {:?}",
            expected.difference(&have).collect::<Vec<_>>()
        ))
    })?;
    let log = s.app_log("steady")?;
    let agent_log = s.kubectl(&["logs", "steady", "-c", AGENT])?;
    let recovered = agent_log
        .lines()
        .find(|l| l.contains("spool recovered"))
        .unwrap_or_default()
        .to_string();
    progress!(
        "[real-pods] restart: kill -9 → restartCount 1 and Ready in {:.1}s; app retried {} times; {} counters accepted, all {} at the platform ({} duplicates); spooled before the kill: {spooled:?}; {recovered}",
        restarted.as_secs_f64(),
        log.matches("not published").count(),
        expected.len(),
        expected.len(),
        got.len() - got.iter().collect::<BTreeSet<_>>().len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Pod deletion with the platform down

/// Deletes an injected pod whose app published `sent` messages while the platform is down;
/// the agent's shutdown deadline passes, it reports what is left, and the gateway shows it
/// after the pod is gone.
async fn deleted_with_the_platform_down(prefix: &str, grace_seconds: i64) -> Result<()> {
    const SENT: u64 = 10;
    let s = setup(prefix, None).await?;
    s.platform.faults().set_down(true);
    let script = format!(
        r#"i=0; while [ $i -lt {SENT} ]; do i=$((i+1)); sh /usr/local/bin/nanogate.sh publish "{{\"host\":\"$HOSTNAME\",\"n\":$i}}" >/dev/null || exit 1; done; echo "published {SENT}"; trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"#
    );
    let mut pod = app_pod(
        s.stack,
        "doomed",
        restricted(json!({})),
        json!({"command": ["sh", "-c", script]}),
    );
    pod["spec"]["terminationGracePeriodSeconds"] = json!(grace_seconds);
    s.run_ready(pod).await?;
    wait_for("the app published", Duration::from_secs(30), || {
        let log = s.app_log("doomed").unwrap_or_default();
        async move { Ok(log.contains(&format!("published {SENT}")).then_some(())) }
    })
    .await?;
    ensure!(s.received_from("doomed").is_empty(), "the platform is down");
    let gateways = nanogate_e2e::agentgateways(&s.client, s.ns());
    wait_sidecars_connected(&s.client, s.ns(), "shop", 1).await?;

    // The agent's log, followed until the container ends (the pod and its logs go away).
    let log_file = s
        .stack
        .cp
        .dir()
        .join(format!("{}-doomed-agent.log", s.ns()));
    let mut follow = nanogate_e2e::kubectl_command(s.stack.cp.kubeconfig_path())
        .args(["logs", "-f", "-n", s.ns(), "doomed", "-c", AGENT])
        .stdout(std::fs::File::create(&log_file)?)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deleted = Instant::now();
    s.kubectl(&["delete", "pod", "doomed", "--wait=false"])?;
    // Until the pod is gone: the last agent status the kubelet reported.
    let pods = s.pods();
    let (mut agent_end, mut app_end) = (None, None);
    wait_for("pod doomed gone", Duration::from_secs(90), || {
        let pod = s.kubectl(&["get", "pod", "doomed", "-o", "json", "--ignore-not-found"]);
        let pod: Option<Pod> = pod.ok().and_then(|p| serde_json::from_str(&p).ok());
        let ended = |name: &str| {
            let state = status_of(pod.as_ref()?, name)?.state?;
            state.terminated
        };
        agent_end = ended(AGENT).or(agent_end.take());
        app_end = ended(APP).or(app_end.take());
        let pods = pods.clone();
        async move { Ok(pods.get_opt("doomed").await?.is_none().then_some(())) }
    })
    .await?;
    let gone = deleted.elapsed();
    let _ = follow.kill();
    let _ = follow.wait();
    let agent_log = std::fs::read_to_string(&log_file)?;
    let at = |needle: &str| {
        agent_log
            .lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
    };
    let stopping = match (at("SIGTERM received"), at("nano-agent stopped")) {
        (Some(term), Some(stopped)) => format!(
            "the agent stopped {:.1}s after SIGTERM",
            (stopped - term).total(k8s_openapi::jiff::Unit::Second)?
        ),
        _ => "the agent never logged that it stopped".to_string(),
    };
    if let Some(end) = &agent_end {
        assert_eq!(
            end.exit_code, 0,
            "the agent finished within the grace period ({stopping}): {end:?}\n{agent_log}"
        );
    }
    assert!(
        agent_log.contains("nano-agent stopped"),
        "the agent finished within the grace period of {grace_seconds}s ({stopping}):\n{agent_log}"
    );

    // The hub writes it at its next status pass; a CI run at load 12 once took longer than
    // 30 s (the shared operator's pass also served eight other tests' gateways).
    let left = wait_for(
        "the gateway to count what was left behind",
        Duration::from_secs(60),
        || {
            let gateways = gateways.clone();
            async move {
                let left = gateways.get("shop").await?.data["status"]["leftBehind"].clone();
                Ok((left["messagesTotal"] == SENT).then_some(left))
            }
        },
    )
    .await
    .map_err(|e| {
        // The operator is shared with other tests: its lines about this namespace.
        let operator_log = std::fs::read_to_string(s.stack.operator.log()).unwrap_or_default();
        let ours: Vec<&str> = operator_log
            .lines()
            .filter(|l| l.contains(s.ns()) || l.contains("leader") || l.contains("status writer"))
            .collect();
        e.context(format!(
            "agent log:\n{agent_log}\noperator log about {} (and leadership):\n{}",
            s.ns(),
            ours[ours.len().saturating_sub(60)..].join("\n")
        ))
    })?;
    let counted = deleted.elapsed();
    assert_eq!(left["shutdownsTotal"], 1, "{left}");
    assert_eq!(left["lastPod"], "doomed", "{left}");
    assert!(left["bytesTotal"].as_u64().unwrap_or(0) > 0, "{left}");
    assert!(
        agent_log.contains(&format!("shutdown deadline: {SENT} messages (")),
        "the agent logs the count: {agent_log}"
    );
    assert!(
        agent_log.contains("left-behind messages reported to the hub (it acknowledged them)"),
        "{agent_log}"
    );
    let events = wait_for(
        "a MessagesLeftBehind event",
        Duration::from_secs(30),
        || async {
            let events = nanogate_e2e::events_about(&s.client, s.ns(), "shop").await?;
            Ok(events
                .into_iter()
                .find(|(reason, _)| reason == "MessagesLeftBehind"))
        },
    )
    .await?;
    assert!(
        events
            .1
            .contains(&format!("pod doomed left {SENT} messages")),
        "{events:?}"
    );
    let table = s.kubectl(&["get", "agw", "shop"])?;
    let cell = nanogate_e2e::table_cell(&table, "LEFT-BEHIND")?;
    assert_eq!(cell, "10", "{table}");
    progress!(
        "[real-pods] {prefix}: grace {grace_seconds}s, {stopping} (exit {:?}; the app's exit {:?}), pod gone {:.1}s after delete, leftBehind {left} after {:.1}s; event: {}",
        agent_end.map(|t| t.exit_code),
        app_end.map(|t| t.exit_code),
        gone.as_secs_f64(),
        counted.as_secs_f64(),
        events.1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_deleted_with_the_platform_down_reports_what_it_left_behind() -> Result<()> {
    deleted_with_the_platform_down("left-behind", 30).await
}

/// The same with a grace period shorter than the agent's default shutdown deadline (20 s):
/// the kubelet kills the agent when the grace period ends, so the agent must finish (and
/// report) before that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_with_a_short_grace_period_still_reports_what_it_left_behind() -> Result<()> {
    deleted_with_the_platform_down("left-behind-grace", 10).await
}

// ---------------------------------------------------------------------------------------------
// kubectl exec

/// `kubectl exec` into the app container: the shell example's one-call form publishes (also
/// with `wait`, which returns the platform's answer) and its self-demonstration runs through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_into_the_app_publishes_with_the_shell_example() -> Result<()> {
    let s = setup("exec", None).await?;
    let pod = app_pod(
        s.stack,
        "shell",
        restricted(json!({})),
        json!({"env": [{"name": "PUBLISH_INTERVAL", "value": "3600"}]}),
    );
    s.run_ready(pod).await?;
    let exec = |args: &[&str]| {
        let mut all = vec![
            "exec",
            "shell",
            "-c",
            APP,
            "--",
            "sh",
            "/usr/local/bin/nanogate.sh",
        ];
        all.extend_from_slice(args);
        s.kubectl(&all)
    };
    let out = exec(&["publish", r#"{"by":"kubectl exec"}"#, r#"["by-hand"]"#])?;
    assert_eq!(out.trim(), "accepted");
    let waited = exec(&[
        "publish",
        r#"{"by":"kubectl exec","wait":true}"#,
        "[]",
        "wait",
    ])?;
    let demo = exec(&[])?;
    assert!(demo.contains("publish: accepted"), "{demo}");
    assert!(demo.contains("publish with wait:"), "{demo}");
    assert!(demo.contains("error:"), "{demo}");
    let got = wait_for(
        "the platform to receive what was published by hand",
        Duration::from_secs(30),
        || {
            let got = s.platform.received();
            async move {
                let by_hand: Vec<Value> = got
                    .into_iter()
                    .filter(|m| {
                        m["data"]["by"] == "kubectl exec" || m["data"]["example"] == "shell"
                    })
                    .collect();
                Ok((by_hand.len() >= 4).then_some(by_hand))
            }
        },
    )
    .await?;
    let tagged = got
        .iter()
        .find(|m| m["data"] == json!({"by": "kubectl exec"}))
        .context("the first message")?;
    assert!(
        tagged.to_string().contains("by-hand"),
        "tags kept: {tagged}"
    );
    assert!(
        got.iter().all(|m| m["data"]["step"] != "rejected"),
        "the example's invalid message is refused: {got:?}"
    );
    progress!(
        "[real-pods] exec: publish → {}, publish wait → {}; the platform received {} messages published by hand",
        out.trim(),
        waited.trim(),
        got.len()
    );
    Ok(())
}
