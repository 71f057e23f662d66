//! The Grafana dashboard (`helm/dashboards/mailferry.json`) queries only metrics the
//! code exports (`shared::telemetry::CATALOGUE`), and covers what an SRE looks at first.

use mailferry_shared::telemetry::{family, CATALOGUE};

fn dashboard() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/dashboards/mailferry.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect(path)).expect("dashboard JSON")
}

/// Every `mailferry_…` and `process_…` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    let next = |r: &str| {
        ["mailferry_", "process_"]
            .iter()
            .filter_map(|p| r.find(p))
            .min()
    };
    while let Some(at) = next(rest) {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.push(name);
    }
    out
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let dash = dashboard();
    let panels = dash["panels"].as_array().expect("panels");
    let mut queried = std::collections::BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} queries nothing");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "panel {title}: {expr} names no metric of ours"
            );
            for name in names {
                assert!(
                    family(&name).is_some(),
                    "panel {title} queries {name}, which the code does not export"
                );
                queried.insert(family(&name).unwrap());
            }
        }
    }
    for wanted in [
        "Throughput",
        "Batch ETA",
        "Users by status",
        "Errors by reason",
        "Worker saturation",
        "Queue depth",
    ] {
        assert!(
            panels.iter().any(|p| p["title"] == wanted),
            "no panel {wanted}"
        );
    }
    // One installation, one batch: every query follows the namespace variable, and those
    // of per-batch measures the batch variable.
    let variables: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        variables.contains(&"namespace") && variables.contains(&"batch"),
        "{variables:?}"
    );
    for panel in panels {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let selectors = metric_names(expr).len();
            assert_eq!(
                expr.matches("namespace=~\"$namespace\"").count(),
                selectors,
                "{expr}: a metric not scoped to $namespace"
            );
            if expr.contains("mailferry_users") {
                assert!(expr.contains("batch=~\"$batch\""), "{expr}");
            }
        }
    }
    // Nothing exported is forgotten by the dashboard.
    let unused: Vec<&str> = CATALOGUE
        .iter()
        .map(|(n, ..)| *n)
        .filter(|n| !queried.contains(n))
        .collect();
    assert!(
        unused.is_empty(),
        "exported but not on the dashboard: {unused:?}"
    );
}

#[test]
fn names_are_found_in_expressions() {
    assert_eq!(
        metric_names("sum(rate(mailferry_a_total[5m])) / max(process_open_fds)"),
        ["mailferry_a_total", "process_open_fds"]
    );
}
