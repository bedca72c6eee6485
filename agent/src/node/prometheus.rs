//! The agent's `/metrics` page: every process's metrics and the agent's health in the
//! Prometheus text exposition format (version 0.0.4), from the metric definitions.
use std::fmt::Write;

use super::{
    encode::{escape, resource_labels},
    metric::{self, Metric},
    netstate,
    state::{ProcessMetrics, Snapshot},
};

/// The snapshot as Prometheus text.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |m: &Metric, rows: Vec<(String, f64)>| {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} {}",
            m.prometheus,
            m.help,
            m.prometheus,
            m.prometheus_type()
        );
        for (labels, value) in rows {
            let _ = writeln!(out, "{}{labels} {value}", m.prometheus);
        }
    };
    let labels = |p: &ProcessMetrics, extra: Option<(&str, &str)>| {
        let mut parts = vec![resource_labels(&p.resource)];
        if let Some((k, v)) = extra {
            parts.push(format!("{k}=\"{}\"", escape(v)));
        }
        format!("{{{}}}", parts.join(","))
    };
    let per = |f: &dyn Fn(&ProcessMetrics) -> f64| -> Vec<(String, f64)> {
        snapshot.processes.values().map(|p| (labels(p, None), f(p))).collect()
    };
    family(&metric::CPU_TIME, per(&|p| p.cpu_seconds));
    family(&metric::CPU_UTILIZATION, per(&|p| p.utilization));
    family(&metric::MEMORY_USAGE, per(&|p| p.memory_bytes as f64));
    // Each process's cgroup figures, read once, then written metric by metric.
    let cgroups: Vec<(String, Vec<(&metric::Metric, f64)>)> = snapshot
        .processes
        .values()
        .filter_map(|p| Some((labels(p, None), metric::cgroup_values(p.cgroup.as_ref()?))))
        .collect();
    for m in metric::CGROUP_METRICS {
        let rows = cgroups
            .iter()
            .filter_map(|(labels, values)| {
                let value = values.iter().find(|(n, _)| n.name == m.name)?.1;
                Some((labels.clone(), value))
            })
            .collect::<Vec<_>>();
        if !rows.is_empty() {
            family(m, rows);
        }
    }
    let functions = snapshot
        .processes
        .values()
        .flat_map(|p| {
            p.top(snapshot.top_functions).into_iter().map(move |(f, v)| (labels(p, Some(("function", f))), v))
        })
        .collect();
    family(&metric::FUNCTION_CPU_TIME, functions);
    let off_cpu: Vec<(String, f64)> = snapshot
        .processes
        .values()
        .flat_map(|p| p.off_cpu.iter().map(move |(state, v)| (labels(p, Some(("state", state))), *v)))
        .collect();
    if !off_cpu.is_empty() {
        family(&metric::OFF_CPU_TIME, off_cpu);
    }
    let gil: Vec<(String, f64)> =
        snapshot.processes.values().filter_map(|p| Some((labels(p, None), p.gil_held_seconds?))).collect();
    if !gil.is_empty() {
        family(&metric::GIL_HELD_TIME, gil);
    }
    // The advice: each recommendation, and each finding as 1 by rule and severity.
    let recommended: Vec<(String, Vec<(&metric::Metric, f64)>)> = snapshot
        .processes
        .values()
        .map(|p| (labels(p, None), super::advice::recommendations(&p.advice)))
        .collect();
    for m in metric::RECOMMENDATIONS {
        let rows: Vec<(String, f64)> = recommended
            .iter()
            .filter_map(|(l, recs)| Some((l.clone(), recs.iter().find(|(r, _)| r.name == m.name)?.1)))
            .collect();
        if !rows.is_empty() {
            family(m, rows);
        }
    }
    let active: Vec<(String, f64)> = snapshot
        .processes
        .values()
        .flat_map(|p| {
            p.advice.iter().map(move |f| {
                let severity =
                    serde_json::to_value(f.severity).ok().and_then(|v| v.as_str().map(String::from));
                let mut l = labels(p, Some(("stoker_advice_rule", f.rule)));
                l.insert_str(
                    l.len() - 1,
                    &format!(",stoker_advice_severity=\"{}\"", severity.unwrap_or_default()),
                );
                (l, 1.0)
            })
        })
        .collect();
    if !active.is_empty() {
        family(&metric::ADVICE_ACTIVE, active);
    }
    for (m, value) in snapshot.health.values() {
        family(m, vec![(String::new(), value as f64)]);
    }
    let losses = snapshot
        .health
        .losses
        .iter()
        .map(|(why, n)| (format!("{{stoker_loss_reason=\"{why}\"}}"), *n as f64));
    family(&metric::KERNEL_LOSSES, losses.collect());
    netstate::prometheus(
        &mut out,
        snapshot.processes.values().map(|p| (&p.net, resource_labels(&p.resource))),
    );
    out
}
