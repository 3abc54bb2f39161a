//! A real node (kubelet 1.20 + containerd + runc + CNI bridge, `nanogate_e2e::Node`): pods run
//! for real. Two containers share an emptyDir and a Unix socket, `kubectl logs` and `exec` go
//! through the kubelet, Jobs complete (or fail) with the containers' real exit codes, a
//! readiness probe gates a Deployment, and this machine reaches pod IPs.
//!
//! The tests share one node (`Node::shared`); its reaper tears it down when this binary exits.
//! Teardown itself is checked by `node_teardown.rs`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Api;
use kube::api::ListParams;
use nanogate_e2e::node::{BUSYBOX_IMAGE, HOST_IP};
use nanogate_e2e::{ControlPlane, Node, TestNamespace, apply_yaml, pod_ready, wait_for};

const POD_TIMEOUT: Duration = Duration::from_secs(120);

struct Setup {
    cp: &'static ControlPlane,
    client: kube::Client,
    ns: TestNamespace,
}

async fn setup(prefix: &str) -> Result<Setup> {
    let node = Node::shared().await?;
    node.import_image(BUSYBOX_IMAGE)?;
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let ns = TestNamespace::create(&client, prefix).await?;
    Ok(Setup { cp, client, ns })
}

fn kubectl(setup: &Setup, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", setup.ns.name()];
    all.extend_from_slice(args);
    setup.cp.kubectl(&all)
}

/// Waits until `probe` returns `Some` for pod `name`.
async fn wait_pod<T>(
    pods: &Api<Pod>,
    name: &str,
    what: &str,
    probe: impl Fn(&Pod) -> Option<T>,
) -> Result<T> {
    let probe = &probe;
    wait_for(&format!("pod {name}: {what}"), POD_TIMEOUT, || async move {
        Ok(pods.get_opt(name).await?.as_ref().and_then(probe))
    })
    .await
}

fn statuses(pod: &Pod) -> Vec<ContainerStatus> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn two_containers_share_an_emptydir_and_a_unix_socket() -> Result<()> {
    let setup = setup("node-pod").await?;
    let ns = setup.ns.name();
    let started = std::time::Instant::now();
    apply_yaml(
        setup.cp.kubeconfig_path(),
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: shared, namespace: {ns}}}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{{name: shared, emptyDir: {{}}}}]
  containers:
  - name: server
    image: {BUSYBOX_IMAGE}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c"]
    args:
    - |
      echo "written by the server in $(hostname)" > /shared/hello.txt
      echo "server: serving /shared/sock"
      exec usock serve /shared/sock pong-over-unix-socket
    volumeMounts: [{{name: shared, mountPath: /shared}}]
  - name: client
    image: {BUSYBOX_IMAGE}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c"]
    args:
    - |
      while [ ! -S /shared/sock ]; do sleep 0.1; done
      echo "client read: $(cat /shared/hello.txt)"
      echo "client got: $(usock connect /shared/sock)"
      exec sleep 100000
    volumeMounts: [{{name: shared, mountPath: /shared}}]
"#
        ),
    )?;
    let pods: Api<Pod> = Api::namespaced(setup.client.clone(), ns);
    let pod = wait_pod(&pods, "shared", "Ready (2/2)", |pod| {
        pod_ready(pod).then(|| pod.clone())
    })
    .await?;
    nanogate_e2e::progress!(
        "[node] pod shared Ready (2/2) in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // Real statuses: the kubelet's, from containerd.
    let status = pod.status.clone().context("pod status")?;
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.host_ip.as_deref(), Some(HOST_IP));
    let pod_ip = status.pod_ip.clone().context("pod IP")?;
    assert!(
        pod_ip.starts_with("10.244.0.") && pod_ip != HOST_IP,
        "pod IP {pod_ip} is not on the node's bridge network"
    );
    let containers = statuses(&pod);
    assert_eq!(containers.len(), 2, "{containers:?}");
    for container in &containers {
        assert!(container.ready, "{container:?}");
        assert_eq!(container.restart_count, 0, "{container:?}");
        let running = container.state.as_ref().and_then(|s| s.running.as_ref());
        assert!(running.is_some(), "{} is not running", container.name);
        let id = container.container_id.as_deref().unwrap_or_default();
        assert!(id.starts_with("containerd://"), "container id {id:?}");
        assert!(!container.image_id.is_empty(), "{container:?}");
    }
    // The server really runs on this machine (in its own namespaces).
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()?;
    assert!(
        String::from_utf8_lossy(&ps.stdout).contains("usock serve /shared/sock"),
        "no usock server among this machine's processes"
    );

    // kubectl logs of each container (the client logs once it got its answer).
    let client_log = wait_for("the client's log", POD_TIMEOUT, || async {
        let log = kubectl(&setup, &["logs", "shared", "-c", "client"])?;
        Ok(log.contains("client got:").then_some(log))
    })
    .await?;
    assert!(
        client_log.contains("client read: written by the server in shared"),
        "{client_log}"
    );
    assert!(
        client_log.contains("client got: pong-over-unix-socket"),
        "{client_log}"
    );
    let server_log = kubectl(&setup, &["logs", "shared", "-c", "server"])?;
    assert!(
        server_log.contains("server: serving /shared/sock"),
        "{server_log}"
    );

    // kubectl exec into the client: same emptyDir, same socket, its own hostname.
    let exec = kubectl(
        &setup,
        &[
            "exec",
            "shared",
            "-c",
            "client",
            "--",
            "sh",
            "-c",
            "hostname; cat /shared/hello.txt; usock connect /shared/sock",
        ],
    )?;
    assert_eq!(
        exec.lines().collect::<Vec<_>>(),
        [
            "shared",
            "written by the server in shared",
            "pong-over-unix-socket"
        ],
        "{exec}"
    );
    // A command that fails in the container fails kubectl exec.
    assert!(kubectl(&setup, &["exec", "shared", "-c", "client", "--", "false"]).is_err());
    Ok(())
}

#[tokio::test]
async fn jobs_end_with_their_containers_real_exit_codes() -> Result<()> {
    let setup = setup("node-job").await?;
    let ns = setup.ns.name();
    let job = |name: &str, script: &str| {
        format!(
            r#"apiVersion: batch/v1
kind: Job
metadata: {{name: {name}, namespace: {ns}}}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: 1
      containers:
      - name: job
        image: {BUSYBOX_IMAGE}
        imagePullPolicy: Never
        command: ["/bin/sh", "-c", "{script}"]
"#
        )
    };
    let started = std::time::Instant::now();
    apply_yaml(
        setup.cp.kubeconfig_path(),
        &job("once", "echo job ran in $(hostname); exit 0"),
    )?;
    apply_yaml(
        setup.cp.kubeconfig_path(),
        &job("fails", "echo about to fail; exit 3"),
    )?;
    let jobs: Api<Job> = Api::namespaced(setup.client.clone(), ns);
    for (name, condition) in [("once", "Complete"), ("fails", "Failed")] {
        let jobs = &jobs;
        wait_for(
            &format!("job {name} {condition}"),
            POD_TIMEOUT,
            || async move {
                let job = jobs.get(name).await?;
                let done = job
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == condition && c.status == "True");
                Ok(done.then_some(()))
            },
        )
        .await?;
    }
    nanogate_e2e::progress!(
        "[node] jobs done in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let pods: Api<Pod> = Api::namespaced(setup.client.clone(), ns);
    for (name, phase, exit_code, reason, output) in [
        ("once", "Succeeded", 0, "Completed", "job ran in once-"),
        ("fails", "Failed", 3, "Error", "about to fail"),
    ] {
        let list = pods
            .list(&ListParams::default().labels(&format!("job-name={name}")))
            .await?;
        ensure!(
            list.items.len() == 1,
            "job {name}: {} pods",
            list.items.len()
        );
        let pod = &list.items[0];
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        assert_eq!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some(phase),
            "{pod_name}"
        );
        let container = statuses(pod).into_iter().next().context("status")?;
        let terminated = container
            .state
            .and_then(|s| s.terminated)
            .with_context(|| format!("{pod_name} has no terminated container"))?;
        assert_eq!(terminated.exit_code, exit_code, "{pod_name}");
        assert_eq!(terminated.reason.as_deref(), Some(reason), "{pod_name}");
        let log = kubectl(&setup, &["logs", &pod_name])?;
        assert!(log.contains(output), "{pod_name}: {log}");
    }
    Ok(())
}

#[tokio::test]
async fn readiness_probe_gates_a_deployment_and_the_host_reaches_its_pods() -> Result<()> {
    let setup = setup("node-deploy").await?;
    // httpd answers 404 until index.html exists, 4 s after the container starts.
    let started = std::time::Instant::now();
    let pods = deploy_web(
        &setup,
        r#"        command: ["/bin/sh", "-c"]
        args:
        - |
          mkdir -p /www
          (sleep 4; hostname > /www/index.html) &
          exec httpd -f -p 8080 -h /www
        readinessProbe:
          httpGet: {path: /, port: 8080}
          periodSeconds: 1
"#,
        "",
    )
    .await?;
    nanogate_e2e::progress!(
        "[node] deployment web 2/2 available in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    assert_eq!(pods.len(), 2);
    let mut gates = Vec::new();
    for pod in &pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        // Ready no sooner than the page exists: the probe, not the container start, decided.
        let container_started = statuses(pod)
            .first()
            .and_then(|c| c.state.clone())
            .and_then(|s| s.running)
            .and_then(|r| r.started_at)
            .with_context(|| format!("{name}: no running container"))?;
        let ready_since = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
            .and_then(|c| c.last_transition_time.clone())
            .with_context(|| format!("{name}: not Ready"))?;
        let gated = ready_since.0.as_second() - container_started.0.as_second();
        assert!(
            gated >= 3,
            "{name} became Ready {gated}s after its container started, before the page existed"
        );
        gates.push(gated);

        // This machine reaches the pod on its IP (the bridge, no proxy).
        let ip = nanogate_e2e::pod_ip(pod).context("pod IP")?;
        let body = http_get(ip, 8080).await?;
        assert_eq!(body.trim(), name, "GET http://{ip}:8080/");
    }
    nanogate_e2e::progress!("[node] pods Ready {gates:?} s after their containers started");
    Ok(())
}

/// Services on the node (`nanogate_e2e::service_network`): kube-proxy routes a ClusterIP from
/// pods and from this machine, cluster DNS resolves `<svc>.<ns>.svc` (and the short name through
/// the search path), a pod reaches itself through its Service (hairpin), the apiserver answers
/// at `kubernetes.default.svc:443`, and nothing outside the cluster resolves.
#[tokio::test]
async fn services_route_and_resolve_from_pods_and_the_host() -> Result<()> {
    let setup = setup("node-svc").await?;
    let ns = setup.ns.name();
    let started = std::time::Instant::now();
    let pods = deploy_web(
        &setup,
        r#"        command: ["/bin/sh", "-c", "mkdir -p /www; hostname > /www/index.html; exec httpd -f -p 8080 -h /www"]
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
"#,
        &format!(
            r#"---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
"#
        ),
    )
    .await?;
    let names: Vec<String> = pods.into_iter().filter_map(|p| p.metadata.name).collect();
    ensure!(names.len() == 2, "{names:?}");
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(setup.client.clone(), ns);
    let cluster_ip = services
        .get("web")
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .context("web's ClusterIP")?;

    // DNS as the node serves it, and this machine through the ClusterIP (nat OUTPUT).
    let fqdn = format!("web.{ns}.svc.cluster.local");
    let resolved = wait_for("web's DNS record", POD_TIMEOUT, || async {
        nanogate_e2e::service_network::resolve(&fqdn)
    })
    .await?;
    assert_eq!(resolved.to_string(), cluster_ip);
    let body = wait_for(
        "this machine to reach web's ClusterIP",
        POD_TIMEOUT,
        || async { Ok(http_get(&cluster_ip, 80).await.ok()) },
    )
    .await?;
    assert!(names.contains(&body.trim().to_string()), "{body}");
    nanogate_e2e::progress!(
        "[node] Service web routed from the host and resolvable {:.1}s after apply",
        started.elapsed().as_secs_f64()
    );

    // From a pod: the name (busybox's nslookup: its own resolver on the pod's resolv.conf), and
    // every replica through the ClusterIP, itself included (hairpin). With `nc`: the static
    // busybox's wget crashes in a FROM-scratch image (glibc's NSS for getservbyname is missing).
    let client = &names[0];
    let resolv = kubectl(&setup, &["exec", client, "--", "cat", "/etc/resolv.conf"])?;
    assert!(resolv.contains("nameserver 10.244.0.1"), "{resolv}");
    assert!(
        resolv.contains(&format!(
            "search {ns}.svc.cluster.local svc.cluster.local cluster.local"
        )),
        "{resolv}"
    );
    let lookup = kubectl(&setup, &["exec", client, "--", "nslookup", &fqdn])?;
    assert!(
        lookup.contains(&format!("Address: {cluster_ip}")),
        "{lookup}"
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let response = pod_http_get(&setup, client, &cluster_ip, 80)?;
        let (_, body) = response.split_once("\r\n\r\n").context(response.clone())?;
        seen.insert(body.trim().to_string());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen,
        names.iter().cloned().collect(),
        "replicas answering web's ClusterIP from {client}"
    );

    // The apiserver through the `kubernetes` Service: its name resolves to 10.0.0.1, and plain
    // HTTP to its TLS port gets Go's "HTTP request to an HTTPS server" answer.
    let lookup = kubectl(
        &setup,
        &[
            "exec",
            client,
            "--",
            "nslookup",
            "kubernetes.default.svc.cluster.local",
        ],
    )?;
    assert!(lookup.contains("Address: 10.0.0.1"), "{lookup}");
    let out = pod_http_get(&setup, client, "10.0.0.1", 443)?;
    assert!(out.starts_with("HTTP/1.0 400 Bad Request"), "{out}");
    assert!(out.contains("HTTP request to an HTTPS server"), "{out}");
    // Nothing outside the cluster resolves.
    let out = kubectl(
        &setup,
        &[
            "exec",
            client,
            "--",
            "sh",
            "-c",
            "nslookup example.com 2>&1; true",
        ],
    )?;
    assert!(out.contains("can't find example.com"), "{out}");
    Ok(())
}

/// The whole response to `GET /` (HTTP/1.0) sent from pod `pod` to `ip:port` with busybox's `nc`.
/// Applies Deployment `web` — 2 busybox httpd pods on port 8080, started and probed as
/// `container` says (the container's remaining fields, YAML indented as in the template) — and
/// the `extra` YAML documents, waits until both pods are available and returns them.
async fn deploy_web(setup: &Setup, container: &str, extra: &str) -> Result<Vec<Pod>> {
    let ns = setup.ns.name();
    apply_yaml(
        setup.cp.kubeconfig_path(),
        &format!(
            "{}{container}{extra}",
            nanogate_e2e::deployment_yaml(
                ns,
                "web",
                2,
                false,
                "{}",
                &format!(
                    "      - name: httpd\n        image: {BUSYBOX_IMAGE}\n        \
                     imagePullPolicy: Never\n"
                ),
            )
        ),
    )?;
    let deployments: Api<Deployment> = Api::namespaced(setup.client.clone(), ns);
    wait_for("deployment web 2/2 available", POD_TIMEOUT, || async {
        let deployment = deployments.get("web").await?;
        let available = deployment
            .status
            .and_then(|s| s.available_replicas)
            .unwrap_or(0);
        Ok((available == 2).then_some(()))
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(setup.client.clone(), ns);
    Ok(pods
        .list(&ListParams::default().labels("app=web"))
        .await?
        .items)
}

fn pod_http_get(setup: &Setup, pod: &str, ip: &str, port: u16) -> Result<String> {
    let script = format!("printf 'GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' | nc -w 3 {ip} {port}");
    kubectl(setup, &["exec", pod, "--", "sh", "-c", &script])
}

/// The body of `GET /` (HTTP/1.0) from `ip:port`.
async fn http_get(ip: &str, port: u16) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::net::TcpStream::connect((ip, port));
    let mut stream = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .with_context(|| format!("connecting to {ip}:{port}"))??;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    ensure!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    let (_, body) = response
        .split_once("\r\n\r\n")
        .context("no body in the response")?;
    Ok(body.to_string())
}
