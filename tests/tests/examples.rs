//! Every app-socket client in `examples/` (Python, Go, Node.js, Rust, shell) run against the
//! real `nano-agent` binary and the platform test server: what each prints (publish accepted,
//! the platform's reply to a waited publish, the msg_check result, the too-many-tags error),
//! what the platform received (content, tags, the agent's stamps), and that each fails with a
//! clear message when no agent listens.
//!
//! A language whose toolchain is missing is reported SKIPPED on stderr and the test returns
//! without asserting anything (`e2e/scripts/setup.sh` installs Go and socat; Python and Node.js
//! come with the machine image).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use nanogate_tests::agent::{Agent, AgentConfig, agent_bin, build_beside_tests};
use nanogate_tests::platform::PlatformServer;
use serde_json::{Value, json};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .join("examples")
}

/// Whether `program args` runs and exits 0 (a toolchain probe).
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The Rust example's binary next to the running test's profile directory, built once per test
/// process (a no-op when fresh), as `agent_bin()` does for nano-agent.
fn rust_example_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        build_beside_tests(
            &["-p", "nanogate-example-client"],
            "nanogate-example-client",
        )
    })
    .clone()
}

/// The agent the examples talk to, in `dir`, delivering to `platform` every 20 ms.
fn start_agent(platform: &PlatformServer, dir: &Path) -> Agent {
    let cfg = AgentConfig::for_platform(agent_bin(), dir, platform, &["--flush-interval", "20ms"]);
    Agent::start(cfg).expect("nano-agent")
}

/// The command that runs one language's example, or why it cannot run here.
fn example_command(lang: &str) -> Result<Command, String> {
    let dir = examples_dir();
    // Per language: whether its toolchain is here, what to say when not, the program, its
    // arguments and the directory it runs in.
    let (available, missing, program, args, cwd): (bool, &str, &str, Vec<OsString>, _) = match lang
    {
        "python" => (
            runs("python3", &["--version"]),
            "python3 not found",
            "python3",
            vec![dir.join("python/nanogate_client.py").into()],
            None,
        ),
        "go" => (
            runs("go", &["version"]),
            "go not found (Debian: apt-get install golang-go; e2e/scripts/setup.sh does)",
            "go",
            vec!["run".into(), ".".into()],
            Some(dir.join("go")),
        ),
        "node" => (
            runs("node", &["--version"]),
            "node not found (Node.js comes with the machine image)",
            "node",
            vec![dir.join("node/nanogate-client.js").into()],
            None,
        ),
        "rust" => return Ok(Command::new(rust_example_bin())),
        "shell" => (
            runs("socat", &["-V"]) || runs("nc", &["-h"]),
            "neither socat nor nc found (apt-get install socat; setup.sh does)",
            "sh",
            vec![dir.join("shell/nanogate.sh").into()],
            None,
        ),
        other => return Err(format!("no example for {other}")),
    };
    if !available {
        return Err(missing.into());
    }
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    Ok(cmd)
}

async fn run(mut cmd: Command, socket: &Path) -> Output {
    cmd.env("TENDRL_SOCKET_PATH", socket)
        .env_remove("TENDRL_SOCKET");
    tokio::task::spawn_blocking(move || cmd.output().expect("starting the example"))
        .await
        .expect("example thread")
}

/// `key: value` lines of the example's standard output.
fn line<'a>(stdout: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}: ");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{key}:` line in the example's output:\n{stdout}"))
}

fn json_line(stdout: &str, key: &str) -> Value {
    let text = line(stdout, key);
    serde_json::from_str(text).unwrap_or_else(|e| panic!("`{key}: {text}` is not JSON: {e}"))
}

async fn check_example(lang: &str) {
    let cmd = match example_command(lang) {
        Ok(cmd) => cmd,
        Err(reason) => {
            eprintln!(
                "\n*** SKIPPED: the {lang} example was NOT run: {reason}. It does not count as passed. ***\n"
            );
            return;
        }
    };
    let started = std::time::Instant::now();
    let platform = PlatformServer::start().await.expect("platform server");
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = start_agent(&platform, dir.path());
    let command_for_app = json!({"cmd": "reload-prices", "for": lang});
    platform.queue_for_check(command_for_app.clone());

    let out = run(cmd, &agent.socket).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{lang} example failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}\nagent log:\n{}",
        out.status,
        agent.log_text()
    );

    // What the example printed.
    assert_eq!(line(&stdout, "publish"), "accepted");
    assert_eq!(
        json_line(&stdout, "publish with wait"),
        json!({"status": "ok", "received": 1}),
        "the platform's reply, relayed"
    );
    assert_eq!(json_line(&stdout, "msg_check"), json!([command_for_app]));
    assert_eq!(
        line(&stdout, "error"),
        "too many tags provided; maximum is 10"
    );

    // What the platform received: both publishes, with their tags and the agent's stamps; the
    // rejected one never.
    assert!(
        platform.wait_for(2, Duration::from_secs(10)).await,
        "the platform received {:?}",
        platform.received()
    );
    tokio::time::sleep(Duration::from_millis(200)).await; // anything more would be a bug
    let received = platform.received();
    assert_eq!(received.len(), 2, "received: {received:#?}");
    let by_step = |step: &str| {
        received
            .iter()
            .find(|m| m["data"]["step"] == step)
            .unwrap_or_else(|| panic!("no {step:?} message among {received:#?}"))
    };
    let published = by_step("publish");
    assert_eq!(
        published["data"],
        json!({"example": lang, "step": "publish"})
    );
    assert_eq!(published["context"]["tags"], json!(["example", lang]));
    let waited = by_step("wait");
    assert_eq!(waited["data"], json!({"example": lang, "step": "wait"}));
    assert_eq!(waited["context"]["tags"], json!(["example"]));
    for m in [published, waited] {
        assert_eq!(m["msg_type"], "publish");
        assert_eq!(m["source"], "test-ns/test-pod", "stamped by the agent: {m}");
        assert!(m["timestamp"].is_string(), "stamped by the agent: {m}");
    }
    assert_eq!(platform.unauthorized(), 0);

    // No agent listening: a non-zero exit and a message that says where it looked.
    let missing = dir.path().join("no-agent.sock");
    let cmd = example_command(lang).expect("probed above");
    let out = run(cmd, &missing).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{lang} example succeeded without an agent"
    );
    assert!(
        stderr.contains(&format!(
            "cannot talk to nano-agent at {}",
            missing.display()
        )),
        "{lang} example's error without an agent: {stderr}"
    );
    eprintln!(
        "{lang} example: passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example() {
    check_example("python").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_example() {
    check_example("go").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_example() {
    check_example("node").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_example() {
    check_example("rust").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_example() {
    check_example("shell").await;
}

/// The shell client's one-call form (what `kubectl exec … -- sh nanogate.sh publish …` in the
/// example app's image uses) and the example app's loop (`shell/publish-loop.sh`, the image's
/// entrypoint): started before the agent it retries, then publishes counters 1, 2, 3, … without
/// a gap, says so on stdout, and exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_one_call_form_and_publish_loop() {
    if let Err(reason) = example_command("shell") {
        eprintln!("\n*** SKIPPED: the shell example was NOT run: {reason}. ***\n");
        return;
    }
    let platform = PlatformServer::start().await.expect("platform server");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let shell = examples_dir().join("shell");

    // The loop first: no agent yet.
    let looping = std::process::Command::new("sh")
        .arg(shell.join("publish-loop.sh"))
        .env("TENDRL_SOCKET_PATH", &socket)
        .env_remove("TENDRL_SOCKET")
        .env("PUBLISH_INTERVAL", "0.2")
        .env("HOSTNAME", "loop-host")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting publish-loop.sh");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let agent = start_agent(&platform, dir.path());
    assert_eq!(agent.socket, socket);
    let counters = || -> Vec<u64> {
        let mut c: Vec<u64> = platform
            .received()
            .iter()
            .filter(|m| m["data"]["app"] == "example-app")
            .filter_map(|m| m["data"]["counter"].as_u64())
            .collect();
        c.sort_unstable();
        c
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while counters().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the loop's messages did not arrive: {:?}\nagent log:\n{}",
            platform.received(),
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopped = Command::new("kill")
        .args(["-TERM", &looping.id().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    let out = tokio::task::spawn_blocking(move || looping.wait_with_output())
        .await
        .expect("thread")
        .expect("publish-loop.sh output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {} on SIGTERM:\n{stdout}",
        out.status
    );
    assert!(
        stdout.contains("counter=1 not published, retrying in 0.2s: cannot talk to nano-agent"),
        "no retry before the agent started:\n{stdout}"
    );
    assert!(
        stdout.contains("publish-loop: published counter=3 (accepted)"),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("publish-loop: SIGTERM: ")
            && last.ends_with(" messages published, exiting"),
        "{stdout}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = counters();
    assert_eq!(
        got,
        (1..=got.len() as u64).collect::<Vec<_>>(),
        "gaps or repeats"
    );
    let first = platform
        .received()
        .into_iter()
        .find(|m| m["data"]["counter"] == 1)
        .expect("counter 1");
    assert_eq!(first["data"]["host"], "loop-host");
    assert_eq!(first["context"]["tags"], json!(["example-app"]));

    // One call at a time, as by hand.
    let call = |args: &[&str]| {
        let out = Command::new("sh")
            .arg(shell.join("nanogate.sh"))
            .args(args)
            .env("TENDRL_SOCKET_PATH", &socket)
            .env_remove("TENDRL_SOCKET")
            .output()
            .expect("nanogate.sh");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(
        call(&["publish", r#"{"by":"hand"}"#, r#"["manual"]"#]),
        (Some(0), "accepted\n".into(), String::new())
    );
    let (code, out, _) = call(&["publish", r#"{"by":"hand","wait":1}"#, "[]", "wait"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(&out).expect("JSON reply"),
        json!({"status": "ok", "received": 1})
    );
    platform.queue_for_check(json!({"cmd": "by-hand"}));
    let (code, out, _) = call(&["check", "5"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(&out).expect("JSON array"),
        json!([{"cmd": "by-hand"}])
    );
    assert_eq!(call(&["check"]).1, "[]\n");
    let tags = r#"["0","1","2","3","4","5","6","7","8","9","10"]"#;
    assert_eq!(
        call(&["publish", "{}", tags]),
        (
            Some(2),
            String::new(),
            "too many tags provided; maximum is 10\n".into()
        )
    );
    assert_eq!(call(&["frobnicate"]).0, Some(64));
    assert!(
        platform
            .received()
            .iter()
            .any(|m| m["data"]["by"] == "hand" && m["context"]["tags"] == json!(["manual"]))
    );
}
