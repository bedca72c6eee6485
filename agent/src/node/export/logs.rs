//! The advice's findings as OTLP log records (for Loki): one record, event `stoker.advice`,
//! when a finding becomes active on a process (again after it went away, again every
//! `advice.window` while it stays, again after the exporter dropped records), with the
//! rule, severity, title, action and the figures as attributes, under the process's resource.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::logs::v1::ExportLogsServiceRequest,
    common::v1::{AnyValue, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    resource::v1::Resource,
};

use crate::{
    advise::rules::{Finding, Severity},
    node::{
        encode::{attribute, stoker_scope},
        state::ProcessMetrics,
    },
};

/// The findings already sent, per process, and when: each goes once while it stays
/// active, and again every `every`.
#[derive(Debug)]
pub struct Advised {
    every: Duration,
    sent: BTreeMap<u32, BTreeMap<&'static str, Instant>>,
    /// The exporter's dropped batches as of the last request.
    dropped: u64,
    /// When drops last had every active finding sent again: at most once per `every`, so
    /// a cause that drops every batch does not resend everything at every export.
    resent: Option<Instant>,
}

impl Advised {
    pub fn new(every: Duration) -> Self {
        Self { every, sent: BTreeMap::new(), dropped: 0, resent: None }
    }

    /// The records of the findings that became active since the last call, or were last
    /// sent `every` ago (None: none). `dropped`: the exporter's dropped batches so far; when
    /// it grew, a record may have been lost, and every active finding goes again.
    pub fn request(
        &mut self,
        processes: &BTreeMap<u32, ProcessMetrics>,
        dropped: u64,
    ) -> Option<ExportLogsServiceRequest> {
        self.request_at(processes, dropped, Instant::now())
    }

    fn request_at(
        &mut self,
        processes: &BTreeMap<u32, ProcessMetrics>,
        dropped: u64,
        at: Instant,
    ) -> Option<ExportLogsServiceRequest> {
        if dropped > self.dropped && self.resent.is_none_or(|t| at.duration_since(t) >= self.every) {
            self.sent.clear();
            self.resent = Some(at);
        }
        self.dropped = dropped;
        self.sent.retain(|pid, _| processes.contains_key(pid));
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let mut resource_logs = Vec::new();
        for (pid, p) in processes {
            let sent = self.sent.entry(*pid).or_default();
            sent.retain(|rule, when| {
                p.advice.iter().any(|f| f.rule == *rule) && at.duration_since(*when) < self.every
            });
            let records: Vec<LogRecord> = p
                .advice
                .iter()
                // Sent when first seen: a later request does not move the time of sending.
                .filter(|f| {
                    f.rule != "healthy" && !sent.contains_key(f.rule) && sent.insert(f.rule, at).is_none()
                })
                .map(|f| record(f, now))
                .collect();
            if records.is_empty() {
                continue;
            }
            resource_logs.push(ResourceLogs {
                resource: Some(Resource {
                    attributes: p.resource.iter().map(|(k, v)| attribute(k, v)).collect(),
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(stoker_scope()),
                    log_records: records,
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        (!resource_logs.is_empty()).then_some(ExportLogsServiceRequest { resource_logs })
    }
}

fn record(f: &Finding, now: u64) -> LogRecord {
    let (number, text) = match f.severity {
        Severity::High => (SeverityNumber::Warn, "WARN"),
        Severity::Medium => (SeverityNumber::Info2, "INFO"),
        Severity::Low | Severity::Info => (SeverityNumber::Info, "INFO"),
    };
    let severity = serde_json::to_value(f.severity).ok();
    let mut attributes = vec![
        attribute("stoker.advice.rule", f.rule),
        attribute("stoker.advice.severity", severity.as_ref().and_then(|v| v.as_str()).unwrap_or("")),
        attribute("stoker.advice.title", &f.title),
        attribute("stoker.advice.action", &f.action),
        attribute("stoker.advice.evidence", &f.evidence.join("; ")),
    ];
    for (key, value) in &f.numbers {
        let value = value.as_str().map_or_else(|| value.to_string(), String::from);
        attributes.push(attribute(&format!("stoker.advice.{key}"), &value));
    }
    LogRecord {
        time_unix_nano: now,
        observed_time_unix_nano: now,
        severity_number: number as i32,
        severity_text: text.into(),
        body: Some(AnyValue { value: Some(any_value::Value::StringValue(f.title.clone())) }),
        attributes,
        event_name: "stoker.advice".into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advise::rules::{Facts, findings};

    #[test]
    fn a_finding_is_sent_once_while_active_and_again_when_back() {
        let facts =
            Facts { pid: 7, elapsed_s: 10.0, cpu_s: Some(10.0), host_cpus: 2.0, ..Default::default() };
        let mut gil = facts.clone();
        gil.states = vec![("[running]".into(), 10.0), ("[gil]".into(), 30.0)];
        let mut processes =
            BTreeMap::from([(7, ProcessMetrics { advice: findings(&gil), ..Default::default() })]);
        let mut advised = Advised::new(Duration::from_secs(3600));
        let t0 = Instant::now();
        let first = advised.request_at(&processes, 0, t0).expect("a record for the new finding");
        let record = &first.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(record.event_name, "stoker.advice");
        assert!(record.attributes.iter().any(|a| a.key == "stoker.advice.rule"));
        assert!(advised.request_at(&processes, 0, t0).is_none(), "sent once while active");
        // Healthy now: nothing to send; gil-bound again later: sent again.
        processes.get_mut(&7).unwrap().advice = findings(&facts);
        assert!(advised.request_at(&processes, 0, t0).is_none());
        processes.get_mut(&7).unwrap().advice = findings(&gil);
        assert!(advised.request_at(&processes, 0, t0).is_some());
        // The exporter dropped a batch since: sent again, once; more drops soon after (a
        // cause that drops every batch) send nothing more until a window has passed.
        assert!(advised.request_at(&processes, 1, t0).is_some());
        assert!(advised.request_at(&processes, 1, t0).is_none());
        assert!(advised.request_at(&processes, 2, t0 + Duration::from_secs(60)).is_none());
        // Still active an hour later: a reminder.
        let later = t0 + Duration::from_secs(3600);
        assert!(advised.request_at(&processes, 2, later).is_some());
        assert!(advised.request_at(&processes, 2, later).is_none());
    }
}
