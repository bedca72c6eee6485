//! `stoker advise --format html`: one self-contained page (no script, no network access):
//! the findings, CPU use over time against the quota, memory against the limit, latency
//! histograms per endpoint, and the wall-clock flamegraph as an image.
use std::fmt::Write as _;

use base64::Engine as _;

#[cfg(test)]
use super::Series;
use super::{Advice, Charts, rules::Severity};

const STYLE: &str = "body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}\
h1{font-size:1.5em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em}\
.finding{border-left:6px solid #888;padding:.4em .8em;margin:.8em 0;background:#fafafa}\
.high{border-color:#c62828}.medium{border-color:#ef6c00}.low{border-color:#1565c0}.info{border-color:#2e7d32}\
.rule{font-family:monospace;font-weight:bold}.sev{font-size:.8em;text-transform:uppercase;margin-right:.5em}\
code{background:#eee;padding:0 .2em}ul{margin:.3em 0}.charts{display:flex;flex-wrap:wrap;gap:1em}\
figure{margin:0}figcaption{font-size:.85em;color:#555}img.flame{width:100%;border:1px solid #ddd}";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The page.
pub fn render(advice: &Advice, charts: &Charts) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>stoker advice</title><style>{STYLE}</style></head><body>"
    );
    let _ = write!(s, "<h1>stoker advice</h1><p>{:.1} s watched.</p>", advice.duration_s);
    for p in &advice.processes {
        let cgroup =
            p.cgroup.as_deref().map_or(String::new(), |c| format!(", cgroup <code>{}</code>", esc(c)));
        let _ = write!(s, "<h2>{} (pid {}{cgroup})</h2>", esc(&p.service), p.pid);
        for f in &p.findings {
            let class = match f.severity {
                Severity::High => "high",
                Severity::Medium => "medium",
                Severity::Low => "low",
                Severity::Info => "info",
            };
            let _ = write!(
                s,
                "<div class=\"finding {class}\"><p><span class=\"sev\">{class}</span><span class=\"rule\">{}</span>: {}</p><ul>",
                f.rule,
                esc(&f.title)
            );
            for e in &f.evidence {
                let _ = write!(s, "<li>{}</li>", esc(e));
            }
            let _ = write!(s, "</ul><p><b>Action:</b> {}</p>", esc(&f.action));
            if let Some(math) = f.numbers.get("math").and_then(|m| m.as_str()) {
                let _ = write!(s, "<p><b>Math:</b> <code>{}</code></p>", esc(math));
            }
            s.push_str("</div>");
        }
        s.push_str("<div class=\"charts\">");
        if let Some(cpu) = charts.cpu.iter().find(|c| c.pid == p.pid) {
            let limit = cpu.limit.map(|q| (q, format!("quota {q:.2} CPUs")));
            let _ = write!(
                s,
                "<figure>{}<figcaption>CPU used (CPUs, per 0.5 s) against {}</figcaption></figure>",
                line_chart(&cpu.points, limit.as_ref().map(|(q, l)| (*q, l.as_str())), "CPUs"),
                limit.as_ref().map_or("no quota".to_string(), |(_, l)| l.clone())
            );
        }
        if let Some(mem) = charts.memory.iter().find(|m| m.pid == p.pid) {
            let mib: Vec<(f64, f64)> =
                mem.points.iter().map(|(t, b)| (*t, b / (1u64 << 20) as f64)).collect();
            let limit = mem.limit.map(|l| {
                (l as f64 / (1u64 << 20) as f64, format!("limit {:.0} MiB", l as f64 / (1u64 << 20) as f64))
            });
            let _ = write!(
                s,
                "<figure>{}<figcaption>cgroup memory (MiB) against {}</figcaption></figure>",
                line_chart(&mib, limit.as_ref().map(|(l, t)| (*l, t.as_str())), "MiB"),
                limit.as_ref().map_or("no limit".to_string(), |(_, t)| t.clone())
            );
        }
        for (pid, name, bounds, counts) in &charts.latency {
            if *pid == p.pid {
                let _ = write!(
                    s,
                    "<figure>{}<figcaption>{}: requests per latency bucket (upper bounds)</figcaption></figure>",
                    histogram(bounds, counts),
                    esc(name)
                );
            }
        }
        s.push_str("</div>");
    }
    if let Some(svg) = &charts.flamegraph {
        let data = base64::engine::general_purpose::STANDARD.encode(svg);
        let _ = write!(
            s,
            "<h2>Wall-clock flamegraph</h2><p>Thread time by stack, each ending with the thread's state.</p><img class=\"flame\" alt=\"wall-clock flamegraph\" src=\"data:image/svg+xml;base64,{data}\">"
        );
    }
    s.push_str("</body></html>\n");
    s
}

const W: f64 = 520.0;
const H: f64 = 220.0;
const PAD: f64 = 40.0;

/// A line of `points` (seconds, value) with an optional dashed limit line.
fn line_chart(points: &[(f64, f64)], limit: Option<(f64, &str)>, unit: &str) -> String {
    let t_max = points.iter().map(|p| p.0).fold(0.0, f64::max).max(1e-9);
    let v_max = points.iter().map(|p| p.1).chain(limit.map(|l| l.0)).fold(0.0, f64::max).max(1e-9) * 1.1;
    let x = |t: f64| PAD + (W - 2.0 * PAD) * t / t_max;
    let y = |v: f64| H - PAD - (H - 2.0 * PAD) * v / v_max;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\">");
    let _ = write!(s, "{}", axes(&format!("{t_max:.1} s"), &format!("{v_max:.2} {unit}")));
    let path: Vec<String> = points.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect();
    let _ = write!(
        s,
        "<polyline fill=\"none\" stroke=\"#1565c0\" stroke-width=\"2\" points=\"{}\"/>",
        path.join(" ")
    );
    if let Some((v, label)) = limit {
        let (right, at, label) = (W - PAD, y(v), esc(label));
        let _ = write!(
            s,
            "<line x1=\"{PAD}\" x2=\"{right}\" y1=\"{at:.1}\" y2=\"{at:.1}\" stroke=\"#c62828\" stroke-dasharray=\"6 4\"/><text x=\"{right}\" y=\"{:.1}\" font-size=\"11\" fill=\"#c62828\" text-anchor=\"end\">{label}</text>",
            at - 4.0
        );
    }
    s.push_str("</svg>");
    s
}

/// Bars of `counts` per bucket (`bounds` in seconds, then one above the last).
fn histogram(bounds: &[f64], counts: &[u64]) -> String {
    let n = counts.len().max(1);
    let c_max = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let bar = (W - 2.0 * PAD) / n as f64;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\">");
    let _ = write!(s, "{}", axes("", &format!("{c_max:.0}")));
    for (i, c) in counts.iter().enumerate() {
        let h = (H - 2.0 * PAD) * *c as f64 / c_max;
        let x = PAD + bar * i as f64;
        let _ = write!(
            s,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#ef6c00\"/>",
            H - PAD - h,
            (bar - 1.0).max(1.0)
        );
        let label = bounds.get(i).map_or("+Inf".to_string(), |b| format!("{:.0}", b * 1e3));
        if i % 2 == 0 || n <= 8 {
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{label}</text>",
                x + bar / 2.0,
                H - PAD + 12.0
            );
        }
    }
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">ms</text>",
        W - PAD,
        H - 8.0
    );
    s.push_str("</svg>");
    s
}

fn axes(x_label: &str, y_label: &str) -> String {
    format!(
        "<line x1=\"{PAD}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#444\"/><line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{0}\" stroke=\"#444\"/>\
         <text x=\"{1}\" y=\"{2}\" font-size=\"10\" text-anchor=\"end\">{3}</text><text x=\"{4}\" y=\"{5}\" font-size=\"10\">{6}</text>\
         <text x=\"{7}\" y=\"{0}\" font-size=\"10\" text-anchor=\"end\">0</text>",
        H - PAD,
        W - PAD,
        H - PAD + 24.0,
        esc(x_label),
        PAD + 4.0,
        PAD - 6.0,
        esc(y_label),
        PAD - 4.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advise::{ProcessAdvice, rules};

    #[test]
    fn the_page_has_findings_charts_and_no_script() {
        let facts = rules::Facts {
            pid: 7,
            service: "svc<x>".into(),
            elapsed_s: 1.0,
            host_cpus: 2.0,
            ..Default::default()
        };
        let advice = Advice {
            duration_s: 1.0,
            flamegraph: None,
            processes: vec![ProcessAdvice {
                pid: 7,
                service: facts.service.clone(),
                cgroup: None,
                findings: rules::findings(&facts),
            }],
            charts: Charts::default(),
        };
        let charts = Charts {
            cpu: vec![Series { pid: 7, points: vec![(0.0, 0.1), (0.5, 0.9)], limit: Some(0.5) }],
            memory: vec![Series { pid: 7, points: vec![(0.0, 1e6), (0.5, 2e6)], limit: Some(4 << 20) }],
            latency: vec![(7, "GET /x".into(), vec![0.005, 0.01], vec![3, 1, 0])],
            flamegraph: Some(b"<svg/>".to_vec()),
        };
        let page = render(&advice, &charts);
        assert!(page.contains("healthy") && page.contains("svc&lt;x&gt;"));
        assert!(page.contains("quota 0.50 CPUs") && page.contains("limit 4 MiB") && page.contains("GET /x"));
        assert!(page.contains("data:image/svg+xml;base64,PHN2Zy8+"));
        assert!(!page.contains("<script"));
    }
}
