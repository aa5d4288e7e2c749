//! Prometheus metrics, kept by hand: a few counters, a latency histogram per route and
//! the writer's queue depth. Rendered in the text exposition format at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the request latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct RouteStats {
    /// count per status code
    statuses: BTreeMap<u16, u64>,
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

/// Process-wide metrics.
#[derive(Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<(String, String), RouteStats>>,
    /// writes queued and not yet taken by the writer
    pub writer_queue_depth: AtomicI64,
    /// transactions committed by the writer
    pub writer_batches: AtomicU64,
    /// requests run by the writer
    pub writer_jobs: AtomicU64,
    /// input refused by the login rate limiter
    pub login_rate_limited: AtomicU64,
    /// connections open now and refused since start (set by the connection gate's owner)
    pub connections_open: AtomicI64,
    pub connections_refused: AtomicU64,
}

impl Metrics {
    /// Records one finished request. A method outside the standard ones counts as `OTHER`,
    /// so a client inventing methods cannot grow the map (routes are the router's own).
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        const METHODS: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
        ];
        let method = METHODS
            .iter()
            .find(|m| **m == method)
            .copied()
            .unwrap_or("OTHER");
        let seconds = elapsed.as_secs_f64();
        let Ok(mut routes) = self.routes.lock() else {
            return;
        };
        let stats = routes
            .entry((method.to_owned(), route.to_owned()))
            .or_default();
        *stats.statuses.entry(status).or_default() += 1;
        stats.count += 1;
        stats.sum_seconds += seconds;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(stats.buckets.iter_mut()) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP labrack_http_requests_total HTTP requests by method, route and status.\n",
        );
        out.push_str("# TYPE labrack_http_requests_total counter\n");
        let routes = match self.routes.lock() {
            Ok(routes) => routes,
            Err(poisoned) => poisoned.into_inner(),
        };
        for ((method, route), stats) in routes.iter() {
            for (status, count) in &stats.statuses {
                let _ = writeln!(
                    out,
                    "labrack_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {count}"
                );
            }
        }
        out.push_str("# HELP labrack_http_request_duration_seconds HTTP request latency.\n");
        out.push_str("# TYPE labrack_http_request_duration_seconds histogram\n");
        for ((method, route), stats) in routes.iter() {
            let labels = format!("method=\"{method}\",route=\"{route}\"");
            for (bound, bucket) in LATENCY_BUCKETS.iter().zip(stats.buckets.iter()) {
                let _ = writeln!(
                    out,
                    "labrack_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {bucket}"
                );
            }
            let _ = writeln!(
                out,
                "labrack_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                stats.count
            );
            let _ = writeln!(
                out,
                "labrack_http_request_duration_seconds_sum{{{labels}}} {}",
                stats.sum_seconds
            );
            let _ = writeln!(
                out,
                "labrack_http_request_duration_seconds_count{{{labels}}} {}",
                stats.count
            );
        }
        drop(routes);
        let gauges: [(&str, &str, &str, i64); 6] = [
            (
                "labrack_connections_open",
                "gauge",
                "Client connections open now.",
                self.connections_open.load(Ordering::Relaxed),
            ),
            (
                "labrack_connections_refused_total",
                "counter",
                "Connections refused by the connection caps.",
                to_i64(self.connections_refused.load(Ordering::Relaxed)),
            ),
            (
                "labrack_writer_queue_depth",
                "gauge",
                "Writes waiting for the group-commit writer.",
                self.writer_queue_depth.load(Ordering::Relaxed),
            ),
            (
                "labrack_writer_batches_total",
                "counter",
                "Transactions committed by the writer.",
                to_i64(self.writer_batches.load(Ordering::Relaxed)),
            ),
            (
                "labrack_writer_jobs_total",
                "counter",
                "Write requests run by the writer.",
                to_i64(self.writer_jobs.load(Ordering::Relaxed)),
            ),
            (
                "labrack_login_rate_limited_total",
                "counter",
                "Logins and joins refused by the rate limiter.",
                to_i64(self.login_rate_limited.load(Ordering::Relaxed)),
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe("GET", "/x", 200, Duration::from_millis(3));
        m.observe("GET", "/x", 404, Duration::from_millis(300));
        let text = m.render();
        assert!(
            text.contains(
                "labrack_http_requests_total{method=\"GET\",route=\"/x\",status=\"200\"} 1"
            )
        );
        assert!(
            text.contains(
                "labrack_http_requests_total{method=\"GET\",route=\"/x\",status=\"404\"} 1"
            )
        );
        assert!(text.contains("le=\"0.005\"} 1"));
        assert!(text.contains("le=\"0.5\"} 2"));
        assert!(text.contains(
            "labrack_http_request_duration_seconds_count{method=\"GET\",route=\"/x\"} 2"
        ));
        for n in 0..100 {
            m.observe(&format!("AAAA{n:04}"), "/x", 405, Duration::from_millis(1));
        }
        let text = m.render();
        assert!(
            text.contains(
                "labrack_http_requests_total{method=\"OTHER\",route=\"/x\",status=\"405\"} 100"
            ),
            "{text}"
        );
        assert!(!text.contains("AAAA"), "invented methods are not keys");
    }
}
