//! The Grafana dashboard (`deploy/grafana/`) parses, and every metric its queries use
//! is one a real node exports on `/metrics`; the compose profile that runs it is valid.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeSet;

use serde_json::Value;
use sessionhub_tests::TestCluster;
use sessionhub_tests::process::repo_root;

/// Every `expr` in the dashboard, wherever it is nested.
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The `sessionhub_…` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("sessionhub_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn the_dashboard_parses_and_uses_only_exported_metrics() {
    let root = repo_root();
    let text =
        std::fs::read_to_string(root.join("deploy/grafana/dashboards/sessionhub.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "sessionhub");
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(all.len() >= 10, "the dashboard has its queries: {all:?}");
    let used: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();

    let cluster = TestCluster::start(1).await;
    let body = reqwest::get(format!("{}/metrics", cluster.nodes[0].base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported: BTreeSet<String> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    for name in &used {
        assert!(
            exported.contains(name),
            "the dashboard uses {name}, which /metrics does not export: {exported:?}"
        );
    }
    // The labels it groups by are the ones exported.
    assert!(body.contains("sessionhub_sessions_ended_total{reason=\"killed\"}"));
}

#[test]
fn the_monitoring_profile_runs_prometheus_and_grafana_with_the_dashboard() {
    let root = repo_root();
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    for needle in [
        "profiles: [\"monitoring\"]",
        "./deploy/grafana/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
        "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro",
        "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro",
    ] {
        assert!(
            compose.contains(needle),
            "{needle} missing from docker-compose.yml"
        );
    }
    let prom = std::fs::read_to_string(root.join("deploy/grafana/prometheus.yml")).unwrap();
    for node in ["node1:8080", "node2:8080", "node3:8080"] {
        assert!(prom.contains(node), "prometheus.yml scrapes {node}");
    }
    let provider =
        std::fs::read_to_string(root.join("deploy/grafana/provisioning/dashboards/sessionhub.yml"))
            .unwrap();
    assert!(provider.contains("/var/lib/grafana/dashboards"));
}
