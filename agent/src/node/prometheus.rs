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
    // Figures each process has some of (computed once per process), as families metric
    // by metric: only those some process has.
    let families_of =
        |metrics: &[&'static Metric], values: &dyn Fn(&ProcessMetrics) -> Vec<(&'static Metric, f64)>| {
            let per_process: Vec<(String, Vec<(&Metric, f64)>)> =
                snapshot.processes.values().map(|p| (labels(p, None), values(p))).collect();
            metrics
                .iter()
                .map(|m| {
                    let rows: Vec<(String, f64)> = per_process
                        .iter()
                        .filter_map(|(l, values)| {
                            Some((l.clone(), values.iter().find(|(n, _)| n.name == m.name)?.1))
                        })
                        .collect();
                    (*m, rows)
                })
                .filter(|(_, rows)| !rows.is_empty())
                .collect::<Vec<_>>()
        };
    for (m, rows) in families_of(&metric::CGROUP_METRICS, &|p| {
        p.cgroup.as_ref().map(metric::cgroup_values).unwrap_or_default()
    }) {
        family(m, rows);
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
    // The pod specs' requests and limits; the advice: each recommendation, and each
    // finding as 1 by rule and severity.
    let declared = families_of(&metric::DECLARED, &|p| {
        p.declared.as_ref().map(metric::declared_values).unwrap_or_default()
    });
    let recommended = families_of(&metric::RECOMMENDATIONS, &|p| super::advice::recommendations(&p.advice));
    for (m, rows) in declared.into_iter().chain(recommended) {
        family(m, rows);
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
    // The agent's own figures carry its own resource's attributes, as in OTLP:
    // `service_name` stoker-agent, `host_name`, and `k8s_node_name` in the DaemonSet.
    let own = resource_labels(&snapshot.agent_resource());
    let braced = |extra: String| {
        let parts: Vec<&str> = [own.as_str(), extra.as_str()].into_iter().filter(|p| !p.is_empty()).collect();
        if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
    };
    for (m, value) in snapshot.health.values() {
        family(m, vec![(braced(String::new()), value as f64)]);
    }
    let losses = snapshot
        .health
        .losses
        .iter()
        .map(|(why, n)| (braced(format!("stoker_loss_reason=\"{why}\"")), *n as f64));
    family(&metric::KERNEL_LOSSES, losses.collect());
    netstate::prometheus(
        &mut out,
        // The kernel's figure is gone once the process is.
        snapshot.processes.values().map(|p| (&p.net, resource_labels(&p.resource), p.accounted.is_some())),
    );
    out
}
