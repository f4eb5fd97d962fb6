//! Runs the load tool (`sessionhub-bench all`) once at a small N against a real
//! three-node cluster, and checks that it completes and prints every figure line,
//! with nothing lost or duplicated. It asserts nothing about speed: benchmarks are
//! not timed tests.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use sessionhub_tests::{API_KEY, TestCluster};

/// Every figure `all` prints, for three nodes with their PIDs and a Redis URL.
const FIGURES: &[&str] = &[
    "nodes",
    "redis_calls_per_connect",
    "redis_cmds_per_connect",
    "redis_calls_per_disconnect",
    "redis_cmds_per_disconnect",
    "redis_calls_per_kill",
    "redis_cmds_per_kill",
    "redis_calls_per_publish",
    "redis_cmds_per_publish",
    "background_sockets",
    "connect_rate",
    "connect_latency_p50",
    "connect_latency_p99",
    "memory_rss_before_node0",
    "memory_rss_after_node0",
    "memory_per_socket_node0",
    "memory_rss_before_node1",
    "memory_rss_after_node1",
    "memory_per_socket_node1",
    "memory_rss_before_node2",
    "memory_rss_after_node2",
    "memory_per_socket_node2",
    "memory_per_socket",
    "kills",
    "kill_latency_p50",
    "kill_latency_p90",
    "kill_latency_p99",
    "kill_latency_max",
    "kill_http_p50",
    "kill_http_p99",
    "kill_frame_p50",
    "kill_notice_p50",
    "kill_notices",
    "deliver_published",
    "deliver_deliveries",
    "deliver_rate",
    "deliver_latency_p50",
    "deliver_latency_p99",
    "deliver_latency_max",
    "deliver_lost",
    "deliver_duplicated",
    "deliver_misrouted",
    "deliver_publish_errors",
];

/// The `sessionhub-bench` binary built by `cargo build --workspace --bins` (or
/// `$SESSIONHUB_BENCH_BIN`).
fn bench_binary() -> PathBuf {
    sessionhub_tests::process::built_binary("sessionhub-bench", "SESSIONHUB_BENCH_BIN")
}

/// Runs the tool (bounded: a hung tool, not a speed assertion), asserts it succeeded,
/// and returns its figures and its output (stdout, then stderr) for messages.
async fn run_tool(
    mut cmd: tokio::process::Command,
    what: &str,
    bound: Duration,
) -> (BTreeMap<String, (f64, String)>, String) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(bound, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("sessionhub-bench {what} did not finish within {bound:?}"))
        .expect("sessionhub-bench could not be run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "sessionhub-bench {what} failed ({}):\n{text}",
        out.status
    );
    (figures(&stdout), text)
}

/// Parses `name: value unit` lines; panics on any other line.
fn figures(stdout: &str) -> BTreeMap<String, (f64, String)> {
    stdout
        .lines()
        .map(|line| {
            let (name, rest) = line
                .split_once(": ")
                .unwrap_or_else(|| panic!("not a figure line: {line:?}"));
            let (value, unit) = rest
                .split_once(' ')
                .unwrap_or_else(|| panic!("figure without a unit: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("figure value is not a number: {line:?}"));
            assert!(!unit.is_empty(), "figure without a unit: {line:?}");
            (name.to_owned(), (value, unit.to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_runs_every_workload_once_at_a_small_n() {
    let cluster = TestCluster::start(3).await;
    let mut cmd = tokio::process::Command::new(bench_binary());
    for node in &cluster.nodes {
        cmd.arg("--node").arg(&node.base);
    }
    cmd.arg("all");
    for node in &cluster.nodes {
        cmd.arg("--node-pid")
            .arg(node.pid().expect("node is running").to_string());
    }
    cmd.arg("--redis-url").arg(cluster.redis.url());
    cmd.args([
        "--sockets",
        "60",
        "--kills",
        "8",
        "--users",
        "20",
        "--messages",
        "300",
        "--concurrency",
        "8",
        "--cost-ops",
        "4",
        "--cost-idle-ms",
        "200",
        "--settle-ms",
        "0",
        "--kill-secs",
        "90",
        "--deliver-secs",
        "90",
    ])
    .env("SESSIONHUB_API_KEY", API_KEY)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);

    // A bound on a hung tool, not a speed assertion.
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("sessionhub-bench did not finish within 120 s")
        .expect("sessionhub-bench could not be run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sessionhub-bench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    let figs = figures(&stdout);
    for name in FIGURES {
        assert!(
            figs.contains_key(*name),
            "no `{name}` figure in:\n{stdout}\n{stderr}"
        );
    }
    let value = |name: &str| figs[name].0;
    assert_eq!(value("deliver_lost"), 0.0, "{stdout}");
    assert_eq!(value("deliver_duplicated"), 0.0, "{stdout}");
    assert_eq!(value("deliver_misrouted"), 0.0, "{stdout}");
    assert_eq!(value("deliver_publish_errors"), 0.0, "{stdout}");
    assert_eq!(value("background_sockets"), 60.0, "{stdout}");
    assert_eq!(value("kills"), 8.0, "{stdout}");
    // Every killed socket (one per node) got `session_ended` before its close frame.
    assert_eq!(value("kill_notices"), 24.0, "{stdout}");
    assert!(
        value("kill_notice_p50") <= value("kill_frame_p50"),
        "{stdout}"
    );
    assert_eq!(value("deliver_published"), 300.0, "{stdout}");
    // Every published message reached the user's socket on each of the 3 nodes.
    assert_eq!(value("deliver_deliveries"), 900.0, "{stdout}");
}

/// The webhook workload once at a small N: the tool is the receiver of two nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tools_webhook_workload_runs_once_at_a_small_n() {
    use sessionhub_tests::webhook::WEBHOOK_SECRET;
    let listen = format!("127.0.0.1:{}", sessionhub_tests::process::free_port());
    let url = format!("http://{listen}/hook");
    let env = [
        ("SESSIONHUB_WEBHOOK_URL", url.as_str()),
        ("SESSIONHUB_WEBHOOK_SECRET", WEBHOOK_SECRET),
    ];
    let cluster = TestCluster::start_with(2, &env).await;
    let mut cmd = tokio::process::Command::new(bench_binary());
    for node in &cluster.nodes {
        cmd.arg("--node").arg(&node.base);
    }
    cmd.args(["webhook", "--listen", &listen, "--events", "50"])
        .arg("--redis-url")
        .arg(cluster.redis.url())
        .env("SESSIONHUB_API_KEY", API_KEY)
        .env("SESSIONHUB_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // A bound on a hung tool, not a speed assertion.
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("sessionhub-bench did not finish within 120 s")
        .expect("sessionhub-bench could not be run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sessionhub-bench failed:\n{stdout}\n{stderr}"
    );
    let figs = figures(&stdout);
    let value = |name: &str| {
        figs.get(name)
            .unwrap_or_else(|| panic!("no `{name}` figure in:\n{stdout}"))
            .0
    };
    assert_eq!(value("webhook_events"), 50.0, "{stdout}");
    assert_eq!(value("webhook_lost"), 0.0, "{stdout}");
    assert_eq!(value("webhook_duplicates"), 0.0, "{stdout}");
    assert_eq!(value("webhook_bad_signatures"), 0.0, "{stdout}");
    assert!(value("events_stream_entries") >= 50.0, "{stdout}");
    for name in [
        "webhook_delay_p50",
        "webhook_delay_p99",
        "events_stream_bytes",
    ] {
        value(name);
    }
}

/// A rolling restart of three nodes (SIGTERM, start again, next) while a publisher
/// sends to users at a steady rate and every client reconnects with `since`: the
/// load tool's `rolling` workload, which must count nothing lost, duplicated or out
/// of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_steady_publishing_loses_and_repeats_nothing() {
    let redis = sessionhub_tests::RedisServer::start().await;
    let mut cmd = tokio::process::Command::new(bench_binary());
    cmd.arg("rolling")
        .arg("--server-bin")
        .arg(sessionhub_tests::process::node_binary())
        .arg("--redis-url")
        .arg(redis.url())
        .args([
            "--nodes",
            "3",
            "--users",
            "60",
            "--rate",
            "200",
            "--settle-ms",
            "1000",
        ])
        .env("SESSIONHUB_API_KEY", API_KEY);
    let (figs, stdout) = run_tool(cmd, "rolling", Duration::from_secs(180)).await;
    let value = |name: &str| {
        figs.get(name)
            .unwrap_or_else(|| panic!("no `{name}` figure in:\n{stdout}"))
            .0
    };
    assert_eq!(value("rolling_restarts"), 3.0, "{stdout}");
    assert!(value("rolling_published") > 0.0, "{stdout}");
    assert_eq!(value("rolling_lost"), 0.0, "{stdout}");
    assert_eq!(value("rolling_duplicated"), 0.0, "{stdout}");
    assert_eq!(value("rolling_out_of_order"), 0.0, "{stdout}");
    assert_eq!(value("rolling_recovery_failed"), 0.0, "{stdout}");
    // Every user's socket moved at least once (its node restarted), and came back
    // with what it missed.
    assert!(value("rolling_reconnects") >= 60.0, "{stdout}");
    assert!(value("rolling_recovered") >= 60.0, "{stdout}");
    assert!(
        value("rolling_delivered") >= value("rolling_published"),
        "{stdout}"
    );
    assert!(value("history_bytes_per_user") > 0.0, "{stdout}");
}
