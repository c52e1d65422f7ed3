//! The Grafana dashboard (`dashboards/opencti-threatbus.json`) queries only metrics the daemon
//! exports, and covers what an operator watches: queue depth and oldest age, delivery
//! latency, outages (reconnects, resubscriptions), gaps, dead letters, intake and delivery.
//!
//! The exported names come from the real exposition, rendered through the library as the
//! daemon's `/metrics` renders it, so a renamed metric fails here, not in someone's Grafana.

use std::collections::BTreeSet;

use opencti_threatbus::metrics::Metrics;
use opencti_threatbus::store::{Store, StoreOptions};
use serde_json::Value;

const DASHBOARD: &str = include_str!("../dashboards/opencti-threatbus.json");

/// Sample names of the exposition (`…_bucket`, `…_total`, gauges), in both text formats.
fn exported_names() -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    // With a position, so that the stream lag is exported too.
    drop(store.set_position("1700000000000-0").unwrap());
    let metrics = Metrics::default();
    let names = |text: &str| -> BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
            .collect()
    };
    let text = names(&metrics.render(&store));
    assert_eq!(text, names(&metrics.render_openmetrics(&store)));
    assert!(text.len() > 10, "{text:?}");
    text
}

/// Words of PromQL that are not metric names when they are not followed by `(`.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects: identifiers outside strings, label
/// matchers (`{…}`), ranges (`[…]`) and label lists (`by (…)`), that are neither a keyword,
/// a function (followed by `(`), a number nor a Grafana variable (`$…`).
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_until = |i: usize, close: char| {
        let mut j = i + 1;
        let mut quote = None;
        while j < chars.len() {
            match (quote, chars[j]) {
                (Some(_), '\\') => j += 1,
                (Some(q), c) if c == q => quote = None,
                (None, '"' | '\'' | '`') => quote = Some(chars[j]),
                (None, c) if c == close => return j + 1,
                _ => {}
            }
            j += 1;
        }
        panic!("unclosed {close:?} in {expr}");
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => i = skip_until(i, '}'),
            '[' => i = skip_until(i, ']'),
            '"' | '\'' | '`' => {
                let quote = c;
                i += 1;
                while i < chars.len() && chars[i] != quote {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_until(i, '}');
                }
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (is_ident(chars[i]) || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let before_paren = chars.get(next) == Some(&'(');
                if LABEL_LISTS.contains(&word.as_str()) && before_paren {
                    i = skip_until(next, ')');
                } else if !before_paren && !KEYWORDS.contains(&word.as_str()) {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Every `expr` of every panel target, wherever it is nested (rows, collapsed rows).
fn expressions(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => expressions(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| expressions(v, out)),
        _ => {}
    }
}

/// The metric of each `label_values(metric, label)` variable query.
fn variable_metrics(dashboard: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        let query = match &var["query"] {
            Value::String(q) => q.clone(),
            Value::Object(q) => q["query"].as_str().unwrap_or("").to_string(),
            _ => continue,
        };
        if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
        {
            if let Some((selector, _label)) = args.rsplit_once(',') {
                names.extend(metric_names(selector));
            }
        }
    }
    names
}

/// Each queried metric with the expression it appears in.
fn queried(dashboard_text: &str) -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(dashboard_text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    expressions(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut queried = Vec::new();
    for expr in exprs {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "no metric found in {expr}");
        queried.extend(names.into_iter().map(|n| (n, expr.clone())));
    }
    for name in variable_metrics(&dashboard) {
        queried.push((name, "a template variable".into()));
    }
    queried
}

fn not_exported(dashboard_text: &str) -> Vec<String> {
    let exported = exported_names();
    queried(dashboard_text)
        .into_iter()
        .filter(|(name, _)| !exported.contains(name))
        .map(|(name, expr)| format!("{name} (in {expr})"))
        .collect()
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    assert_eq!(not_exported(DASHBOARD), Vec::<String>::new());
}

#[test]
fn the_check_catches_a_metric_the_daemon_does_not_export() {
    let typo = DASHBOARD.replacen(
        "opencti_threatbus_queue_oldest_age_seconds",
        "opencti_threatbus_queue_oldest_age",
        1,
    );
    assert_ne!(typo, DASHBOARD);
    let missing = not_exported(&typo);
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(missing[0].starts_with("opencti_threatbus_queue_oldest_age "));
}

#[test]
fn the_dashboard_shows_what_an_operator_watches() {
    let queried: BTreeSet<String> = queried(DASHBOARD).into_iter().map(|(n, _)| n).collect();
    for name in [
        "opencti_threatbus_queue_depth",
        "opencti_threatbus_queue_oldest_age_seconds",
        "opencti_threatbus_delivery_latency_seconds_bucket",
        "opencti_threatbus_stream_reconnects_total",
        "opencti_threatbus_threatbus_resubscriptions_total",
        "opencti_threatbus_stream_gaps_total",
        "opencti_threatbus_dead_total",
        "opencti_threatbus_received_total",
        "opencti_threatbus_delivered_total",
    ] {
        assert!(
            queried.contains(name),
            "the dashboard does not query {name}"
        );
    }
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le, queue) (rate(a_bucket{queue="x",instance=~"$instance"}[$__rate_interval]))) / on(queue) group_left b_total offset 5m"#
        ),
        vec!["a_bucket", "b_total"]
    );
    assert_eq!(
        metric_names(r#"sum(increase(c_total{l="a{b}"}[${__range}])) > bool 0"#),
        vec!["c_total"]
    );
}
