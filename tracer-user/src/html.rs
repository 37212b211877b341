//! `iopath report --html`: the report as one self-contained page. Inline CSS and SVG, no script,
//! and a Content-Security-Policy that forbids every fetch, so the page works offline and a
//! reference to anything outside it would show as a console error.

use std::fmt::Write as _;

use crate::{
    report::us,
    waterfall::{Report, StageHist, Waterfall, describe},
};

/// Text for HTML content and attribute values (VM names come from the VMMs' command lines).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An id from a stage or path name (`blk.device` -> `blk-device`).
fn id(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// A stage's colour: one per stage of the table, the same in every figure.
fn colour(stage: &str) -> &'static str {
    const PALETTE: [&str; 20] = [
        "#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#8cd17d", "#b6992d", "#f1ce63",
        "#499894", "#86bcb6", "#e15759", "#ff9d9a", "#79706e", "#bab0ac", "#d37295", "#fabfd2",
        "#b07aa1", "#d4a6c8", "#9d7660", "#d7b5a6",
    ];
    let i = crate::stages::STAGES
        .iter()
        .position(|s| s.name == stage)
        .unwrap_or(PALETTE.len() - 1);
    PALETTE[i % PALETTE.len()]
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:60em;\
color:#222}h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;margin-top:2em}\
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 8px;text-align:right}\
td:first-child,th:first-child{text-align:left}th{border-bottom:1px solid #999}\
svg{display:block;margin:.5em 0}svg text{font:11px system-ui,sans-serif;fill:#333}\
.note{color:#555}.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.3em}";

/// The whole page.
pub fn page(r: &Report) -> String {
    let mut out = String::new();
    let title = match &r.vm {
        Some(vm) => format!("iopath report: vm {vm}"),
        None => "iopath report".to_string(),
    };
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         style-src 'unsafe-inline'\"><title>{}</title><style>{STYLE}</style></head><body>\
         <h1>{}</h1><p id=\"meta\">{}</p>",
        esc(&title),
        esc(&title),
        esc(&describe(&r.meta))
    );
    out.push_str("<nav><ul><li><a href=\"#waterfalls\">Waterfalls</a></li>");
    for p in &r.paths {
        let _ = write!(
            out,
            "<li><a href=\"#path-{}\">{} stages</a></li>",
            id(&p.path),
            esc(&p.path)
        );
    }
    out.push_str("</ul></nav>");

    out.push_str(
        "<section id=\"waterfalls\"><h2>Waterfalls</h2><p class=\"note\">Each stage's p50 and \
         p99, laid from where the previous stage's ends. A total is a sum of stage quantiles, \
         not the path's own quantile: each stage counts its own events.</p>",
    );
    if r.waterfalls.is_empty() {
        out.push_str(
            "<p>No VM's path had events; the host's own I/O is in the stage sections.</p>",
        );
    }
    for w in &r.waterfalls {
        waterfall(&mut out, w);
    }
    out.push_str("</section>");

    for p in &r.paths {
        let _ = write!(
            out,
            "<section id=\"path-{}\" class=\"path\"><h2>{} stages</h2>",
            id(&p.path),
            esc(&p.path)
        );
        for s in &p.stages {
            histogram(&mut out, s);
        }
        out.push_str("</section>");
    }

    if !r.ceilings.is_empty() {
        out.push_str("<section id=\"ceilings\"><h2>Backends</h2><ul>");
        for c in &r.ceilings {
            let _ = write!(out, "<li>{}</li>", esc(c));
        }
        out.push_str("</ul></section>");
    }
    out.push_str("<section id=\"coverage\"><h2>Coverage</h2>");
    if r.unavailable.is_empty() {
        out.push_str("<p>Every stage was attached.</p>");
    } else {
        out.push_str("<ul>");
        for (stage, why) in &r.unavailable {
            let _ = write!(out, "<li><b>{}</b>: {}</li>", esc(stage), esc(why));
        }
        out.push_str("</ul>");
    }
    let dropped: u64 = r.dropped.iter().map(|d| d.2).sum();
    let _ = write!(
        out,
        "<p id=\"dropped\" data-events=\"{dropped}\">Dropped events: {dropped}</p>"
    );
    if !r.dropped.is_empty() {
        out.push_str("<ul>");
        for (stage, reason, n) in &r.dropped {
            let _ = write!(out, "<li>{} {}: {n}</li>", esc(stage), esc(reason));
        }
        out.push_str("</ul>");
    }
    out.push_str("</section>");
    if !r.timelines.is_empty() {
        out.push_str(
            "<section id=\"timelines\"><h2>Sampled I/Os</h2><p class=\"note\">The slowest \
             of the sampled I/Os, stage by stage: when each stage started after the first, and \
             how long it took (µs).</p>",
        );
        for t in &r.timelines {
            let vm = t.vm();
            let _ = write!(
                out,
                "<table class=\"timeline\" data-trace=\"{}\"><caption>trace {} vm {}: {:.1} µs\
                 </caption><tr><th>stage</th><th>start</th><th>µs</th></tr>",
                esc(&t.trace_id),
                esc(&t.trace_id),
                esc(vm),
                t.total_us
            );
            for s in &t.steps {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>+{:.1}</td><td>{:.1}</td></tr>",
                    esc(&s.stage),
                    s.start_us,
                    s.us
                );
            }
            out.push_str("</table>");
        }
        out.push_str("</section>");
    }
    out.push_str("</body></html>\n");
    out
}

/// A waterfall: a p50 row and a p99 row on one scale (the p99 total), each stage a bar from
/// where the previous one ends, then the table of its figures.
fn waterfall(out: &mut String, w: &Waterfall) {
    const W: f64 = 760.0;
    const LEFT: f64 = 40.0;
    const ROW: f64 = 26.0;
    let scale = (W - LEFT - 10.0) / w.p99_total_us.max(w.p50_total_us).max(1e-9);
    let _ = write!(
        out,
        "<figure id=\"waterfall-{}\" class=\"waterfall\" data-p50-total-us=\"{:.3}\" \
         data-p99-total-us=\"{:.3}\"><figcaption><b>{}</b>: p50 {} µs, p99 {} µs in \
         total</figcaption><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" \
         height=\"{}\" role=\"img\">",
        w.id,
        w.p50_total_us,
        w.p99_total_us,
        esc(w.title),
        us(w.p50_total_us),
        us(w.p99_total_us),
        2.0 * ROW + 20.0
    );
    for (row, (label, y)) in [("p50", 4.0), ("p99", 4.0 + ROW)].into_iter().enumerate() {
        let _ = write!(
            out,
            "<text x=\"0\" y=\"{:.1}\">{label}</text>",
            y + ROW / 2.0 + 1.0
        );
        for s in &w.steps {
            let (start, len) = if row == 0 {
                (s.p50_start_us, s.summary.p50_us)
            } else {
                (s.p99_start_us, s.summary.p99_us)
            };
            let _ = write!(
                out,
                "<rect class=\"bar\" data-row=\"{label}\" data-stage=\"{}\" \
                 data-start-us=\"{start:.3}\" data-us=\"{len:.3}\" x=\"{:.2}\" y=\"{y:.1}\" \
                 width=\"{:.2}\" height=\"{:.1}\" fill=\"{}\"><title>{} {label}: {} µs (from \
                 {} µs)</title></rect>",
                s.stage,
                LEFT + start * scale,
                (len * scale).max(0.5),
                ROW - 6.0,
                colour(s.stage),
                s.stage,
                us(len),
                us(start)
            );
        }
    }
    let _ = write!(
        out,
        "<text x=\"{LEFT}\" y=\"{:.1}\">0</text><text x=\"{:.1}\" y=\"{:.1}\" \
         text-anchor=\"end\">{} µs</text></svg>",
        2.0 * ROW + 16.0,
        W - 10.0,
        2.0 * ROW + 16.0,
        us(w.p99_total_us.max(w.p50_total_us))
    );
    out.push_str(
        "<table><tr><th>stage</th><th>events</th><th>p50 from</th><th>p50</th>\
         <th>p99 from</th><th>p99</th></tr>",
    );
    for s in &w.steps {
        let _ = write!(
            out,
            "<tr><td><span class=\"swatch\" style=\"background:{}\"></span>{}{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            colour(s.stage),
            s.stage,
            s.note.map_or(String::new(), |n| format!(
                " <small class=\"note\">({})</small>",
                esc(n)
            )),
            s.summary.count,
            us(s.p50_start_us),
            us(s.summary.p50_us),
            us(s.p99_start_us),
            us(s.summary.p99_us)
        );
    }
    let _ = write!(
        out,
        "<tr><th>total</th><th></th><th></th><th>{}</th><th></th><th>{}</th></tr></table>",
        us(w.p50_total_us),
        us(w.p99_total_us)
    );
    if !w.not_measured.is_empty() {
        let _ = write!(
            out,
            "<p class=\"note\">Not measured (not in the sums): {}</p>",
            w.not_measured.join(", ")
        );
    }
    for n in &w.notes {
        let _ = write!(out, "<p class=\"note posted\">{}</p>", esc(n));
    }
    out.push_str("</figure>");
}

/// A stage's histogram: its buckets on a log x axis (decades of µs), events on a linear y
/// axis, with its p50 and p99 marked.
fn histogram(out: &mut String, s: &StageHist) {
    const W: f64 = 760.0;
    const H: f64 = 160.0;
    const LEFT: f64 = 50.0;
    const BOTTOM: f64 = 20.0;
    // bounds in µs; bucket 0 starts at 0, drawn from half its upper bound
    let span = |b: &crate::waterfall::Bucket| {
        let hi = b.hi_ns.map_or(b.lo_ns as f64 * 1.25, |h| h as f64) / 1e3;
        let lo = if b.lo_ns == 0 {
            hi / 2.0
        } else {
            b.lo_ns as f64 / 1e3
        };
        (lo, hi)
    };
    let (first, last) = match (s.buckets.first(), s.buckets.last()) {
        (Some(f), Some(l)) => (span(f).0, span(l).1),
        _ => return,
    };
    let (d0, d1) = (
        first.log10().floor(),
        last.log10().ceil().max(first.log10().floor() + 1.0),
    );
    // the right margin holds the last decade's label
    let x = |v: f64| LEFT + (v.log10() - d0) / (d1 - d0) * (W - LEFT - 30.0);
    let max = s.buckets.iter().map(|b| b.events).max().unwrap_or(1).max(1) as f64;
    let y = |n: f64| H - BOTTOM - n / max * (H - BOTTOM - 10.0);
    let m = &s.summary;
    let _ = write!(
        out,
        "<figure id=\"hist-{}\" class=\"histogram\" data-stage=\"{}\" data-events=\"{}\">\
         <figcaption><b>{}</b>: {} events over {} series; p50 {} µs, p99 {} µs, p99.9 {} µs, \
         max {} µs</figcaption><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" \
         height=\"{H}\" role=\"img\">",
        id(&s.stage),
        esc(&s.stage),
        m.count,
        esc(&s.stage),
        m.count,
        s.series,
        us(m.p50_us),
        us(m.p99_us),
        us(m.p999_us),
        us(m.max_us)
    );
    let _ = write!(
        out,
        "<line x1=\"{LEFT}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#999\"/>\
         <text x=\"{2:.1}\" y=\"14\" text-anchor=\"end\">{3}</text>\
         <text x=\"{2:.1}\" y=\"{4:.1}\" text-anchor=\"end\">0</text>",
        H - BOTTOM,
        W - 10.0,
        LEFT - 4.0,
        max as u64,
        H - BOTTOM
    );
    for b in &s.buckets {
        let (lo, hi) = span(b);
        let _ = write!(
            out,
            "<rect class=\"bucket\" data-events=\"{}\" x=\"{:.2}\" y=\"{:.2}\" width=\"{:.2}\" \
             height=\"{:.2}\" fill=\"{}\"><title>({} µs, {}]: {} events</title></rect>",
            b.events,
            x(lo),
            y(b.events as f64),
            (x(hi) - x(lo)).max(0.5),
            (H - BOTTOM) - y(b.events as f64),
            colour(&s.stage),
            us(lo),
            b.hi_ns
                .map_or("+Inf".to_string(), |h| us(h as f64 / 1e3) + " µs"),
            b.events
        );
    }
    let mut d = d0;
    while d <= d1 {
        let v = 10f64.powf(d);
        let label = match v {
            v if v >= 1e6 => format!("{}s", v / 1e6),
            v if v >= 1e3 => format!("{}ms", v / 1e3),
            v if v >= 1.0 => format!("{v}µs"),
            v => format!("{}ns", v * 1e3),
        };
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            x(v),
            H - 4.0
        );
        d += 1.0;
    }
    for (q, v) in [("p50", m.p50_us), ("p99", m.p99_us)] {
        if v > 0.0 {
            let _ = write!(
                out,
                "<line class=\"quantile\" data-q=\"{q}\" x1=\"{0:.1}\" y1=\"10\" x2=\"{0:.1}\" \
                 y2=\"{1:.1}\" stroke=\"#222\" stroke-dasharray=\"3,3\"/><text x=\"{2:.1}\" \
                 y=\"22\">{q}</text>",
                x(v),
                H - BOTTOM,
                x(v) + 3.0
            );
        }
    }
    out.push_str("</svg></figure>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(id("net.rx.host_stack"), "net-rx-host-stack");
    }

    #[test]
    fn the_page_forbids_fetches_and_holds_each_section() {
        let lo = tracer_common::hist::lower_bound_ns(tracer_common::hist::bucket_index(50_000));
        let vm = "<x-vm>db</x-vm>";
        let capture = serde_json::json!({
            "series": [{
                "stage": "blk.device", "path": "block", "labels": {"vm": vm, "op": "read"},
                "buckets": [[lo, 7]], "sum_ns": 350_000,
            }],
            "disk_backends": [{"labels": {"vm": vm, "disk": "<x-disk>vdb</x-disk>"},
                "cpu_per_request_us": 10.0, "ceiling_iops": 1e5}],
            "meta": {"host": "<script>h</script>", "kernel": "6.1", "iopath": "0.1.0",
                "started_unix": 0.0, "duration_s": 1.0},
        });
        let r = crate::waterfall::report(&capture, Some(vm)).unwrap();
        let p = page(&r);
        assert!(p.contains("default-src 'none'"));
        assert!(p.contains("id=\"waterfall-disk-request\""), "{p}");
        assert!(
            p.contains(
                "id=\"hist-blk-device\" class=\"histogram\" data-stage=\"blk.device\" \
                 data-events=\"7\""
            ),
            "{p}"
        );
        assert!(p.contains("id=\"path-block\""));
        // the VM's name in the title and the ceilings, the host in the header: all escaped
        assert!(
            p.contains("<title>iopath report: vm &lt;x-vm&gt;db&lt;/x-vm&gt;</title>"),
            "{p}"
        );
        assert!(
            p.contains("disk=&quot;&lt;x-disk&gt;vdb&lt;/x-disk&gt;&quot;"),
            "{p}"
        );
        for raw in ["<x-vm>", "<x-disk>", "<script>"] {
            assert!(!p.contains(raw), "{raw} went in unescaped: {p}");
        }
    }
}
