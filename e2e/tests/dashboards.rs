//! The Grafana dashboard and the Prometheus alerting rules in `k8s/base/monitoring/` only use
//! metrics the gateway really registers (a renamed metric would silently blank a panel or an
//! alert).

use std::collections::BTreeSet;

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("writeback_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_owned();
        if base != "writeback_" && !base.starts_with("writeback_relay") {
            out.insert(base);
        }
    }
    out
}

#[test]
fn dashboards_and_alerts_use_exported_metrics() {
    let root = testkit::workspace_root();
    // Families without samples yet are not rendered, so check the registered names.
    let exported = std::fs::read_to_string(root.join("cloud-gateway/src/metrics.rs")).unwrap();
    let monitoring = root.join("k8s/base/monitoring");
    let dashboard = std::fs::read_to_string(monitoring.join("grafana-dashboard.json")).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is valid JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let alerts = std::fs::read_to_string(monitoring.join("prometheus-alerts.yml")).unwrap();
    for (file, text) in [
        ("grafana-dashboard.json", &dashboard),
        ("prometheus-alerts.yml", &alerts),
    ] {
        let names = metric_names(text);
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in names {
            assert!(
                exported.contains(&format!("\"{name}\"")),
                "{file} uses {name}, which the gateway does not register"
            );
        }
    }
    for alert in [
        "WritebackNoLiveAgent",
        "WritebackForestUnhealthy",
        "WritebackQueueStuck",
        "WritebackResetBurst",
        "WritebackErrorRatio",
    ] {
        assert!(
            alerts.contains(&format!("alert: {alert}")),
            "missing alert {alert}"
        );
    }
}
