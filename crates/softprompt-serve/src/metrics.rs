//! Counters and histograms, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Fixed-bucket histogram.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const SIZE_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug)]
struct Inner {
    started: std::time::Instant,
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    queue_wait: Histogram,
    classify_batch_rows: Histogram,
    classify_batch_prompts: Histogram,
    decode_batch_rows: Histogram,
    decode_batch_prompts: Histogram,
    generated_tokens: BTreeMap<String, u64>,
    classified_rows: BTreeMap<String, u64>,
}

/// Server metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
    /// Requests admitted and not yet started by the engine.
    pub queued: Arc<AtomicUsize>,
    /// Sequences being decoded.
    pub active: Arc<AtomicUsize>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Arc::new(Mutex::new(Inner {
                started: std::time::Instant::now(),
                requests: BTreeMap::new(),
                latency: BTreeMap::new(),
                queue_wait: Histogram::new(LATENCY_BOUNDS),
                classify_batch_rows: Histogram::new(SIZE_BOUNDS),
                classify_batch_prompts: Histogram::new(SIZE_BOUNDS),
                decode_batch_rows: Histogram::new(SIZE_BOUNDS),
                decode_batch_prompts: Histogram::new(SIZE_BOUNDS),
                generated_tokens: BTreeMap::new(),
                classified_rows: BTreeMap::new(),
            })),
            queued: Arc::new(AtomicUsize::new(0)),
            active: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// One finished HTTP request.
    pub fn request(&self, endpoint: &str, status: u16, seconds: f64) {
        self.with(|m| {
            *m.requests
                .entry((endpoint.to_string(), status))
                .or_default() += 1;
            m.latency
                .entry(endpoint.to_string())
                .or_insert_with(|| Histogram::new(LATENCY_BOUNDS))
                .observe(seconds);
        });
    }

    /// Time a job waited in the queue.
    pub fn queue_wait(&self, seconds: f64) {
        self.with(|m| m.queue_wait.observe(seconds));
    }

    /// One classification forward pass of `rows` rows over `prompts` distinct prompts.
    pub fn classify_batch(&self, rows: usize, prompts: usize, per_prompt: &[(String, usize)]) {
        self.with(|m| {
            m.classify_batch_rows.observe(rows as f64);
            m.classify_batch_prompts.observe(prompts as f64);
            for (name, n) in per_prompt {
                *m.classified_rows.entry(name.clone()).or_default() += *n as u64;
            }
        });
    }

    /// One decode step of `rows` sequences over `prompts` distinct prompts.
    pub fn decode_step(&self, rows: usize, prompts: usize) {
        self.with(|m| {
            m.decode_batch_rows.observe(rows as f64);
            m.decode_batch_prompts.observe(prompts as f64);
        });
    }

    /// Tokens generated for `prompt`.
    pub fn generated(&self, prompt: &str, tokens: usize) {
        self.with(|m| *m.generated_tokens.entry(prompt.to_string()).or_default() += tokens as u64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let queued = self.queued.load(Ordering::Relaxed);
        let active = self.active.load(Ordering::Relaxed);
        self.with(|m| {
            let mut o = String::new();
            let up = m.started.elapsed().as_secs_f64();
            let _ = writeln!(o, "# HELP softprompt_uptime_seconds Seconds since start.");
            let _ = writeln!(o, "# TYPE softprompt_uptime_seconds gauge");
            let _ = writeln!(o, "softprompt_uptime_seconds {up}");
            let _ = writeln!(
                o,
                "# HELP softprompt_queue_depth Requests admitted and not yet started."
            );
            let _ = writeln!(o, "# TYPE softprompt_queue_depth gauge");
            let _ = writeln!(o, "softprompt_queue_depth {queued}");
            let _ = writeln!(o, "# HELP softprompt_active_sequences Sequences being decoded.");
            let _ = writeln!(o, "# TYPE softprompt_active_sequences gauge");
            let _ = writeln!(o, "softprompt_active_sequences {active}");
            let _ = writeln!(o, "# HELP softprompt_requests_total HTTP requests by endpoint and status.");
            let _ = writeln!(o, "# TYPE softprompt_requests_total counter");
            for ((e, s), n) in &m.requests {
                let _ = writeln!(
                    o,
                    "softprompt_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
                );
            }
            let _ = writeln!(o, "# HELP softprompt_request_seconds Request latency by endpoint.");
            let _ = writeln!(o, "# TYPE softprompt_request_seconds histogram");
            for (e, h) in &m.latency {
                h.render(
                    &mut o,
                    "softprompt_request_seconds",
                    &format!("endpoint=\"{e}\""),
                );
            }
            let hists = [
                ("softprompt_queue_wait_seconds", "Time from admission to the engine.", &m.queue_wait),
                ("softprompt_classify_batch_rows", "Rows per classification forward pass.", &m.classify_batch_rows),
                ("softprompt_classify_batch_prompts", "Distinct prompts per classification forward pass.", &m.classify_batch_prompts),
                ("softprompt_decode_batch_rows", "Sequences per decode step.", &m.decode_batch_rows),
                ("softprompt_decode_batch_prompts", "Distinct prompts per decode step.", &m.decode_batch_prompts),
            ];
            for (name, help, h) in hists {
                let _ = writeln!(o, "# HELP {name} {help}");
                let _ = writeln!(o, "# TYPE {name} histogram");
                h.render(&mut o, name, "");
            }
            let _ = writeln!(o, "# HELP softprompt_generated_tokens_total Tokens generated per prompt (rate() gives tokens/s).");
            let _ = writeln!(o, "# TYPE softprompt_generated_tokens_total counter");
            for (p, n) in &m.generated_tokens {
                let _ = writeln!(o, "softprompt_generated_tokens_total{{prompt=\"{p}\"}} {n}");
            }
            let _ = writeln!(o, "# HELP softprompt_classified_rows_total Texts classified per prompt.");
            let _ = writeln!(o, "# TYPE softprompt_classified_rows_total counter");
            for (p, n) in &m.classified_rows {
                let _ = writeln!(o, "softprompt_classified_rows_total{{prompt=\"{p}\"}} {n}");
            }
            o
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.decode_step(3, 2);
        m.decode_step(20, 5);
        m.generated("sst2", 7);
        m.request("/v1/classify", 200, 0.02);
        let text = m.render();
        assert!(
            text.contains("softprompt_decode_batch_rows_bucket{le=\"4\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("softprompt_decode_batch_rows_bucket{le=\"32\"} 2\n"));
        assert!(text.contains("softprompt_decode_batch_rows_sum 23\n"));
        assert!(text.contains("softprompt_generated_tokens_total{prompt=\"sst2\"} 7\n"));
        assert!(text
            .contains("softprompt_requests_total{endpoint=\"/v1/classify\",status=\"200\"} 1\n"));
        assert!(text.contains(
            "softprompt_request_seconds_bucket{endpoint=\"/v1/classify\",le=\"0.025\"} 1\n"
        ));
    }
}
