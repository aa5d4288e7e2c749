//! Prometheus metrics through `prometheus-client` (the Prometheus project's own crate): a
//! request counter and latency histogram per route, the writer's queue, the connection
//! gate and the login limiter. Each server has a registry of its own (tests run several in
//! one process), rendered in the OpenMetrics text format at `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the request latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Process-wide metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// writes queued and not yet taken by the writer
    pub writer_queue_depth: Gauge,
    /// transactions committed by the writer
    pub writer_batches: Counter,
    /// requests run by the writer
    pub writer_jobs: Counter,
    /// input refused by the login rate limiter
    pub login_rate_limited: Counter,
    /// connections open now (set by the connection gate's owner before each render)
    pub connections_open: Gauge,
    /// connections refused since start (brought up to the gate's count before each render)
    pub connections_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("labrack");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let metrics = Self {
            writer_queue_depth: Gauge::default(),
            writer_batches: Counter::default(),
            writer_jobs: Counter::default(),
            login_rate_limited: Counter::default(),
            connections_open: Gauge::default(),
            connections_refused: Counter::default(),
            requests: requests.clone(),
            latency: latency.clone(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            requests,
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            latency,
        );
        registry.register(
            "connections_open",
            "Client connections open now",
            metrics.connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused by the connection caps",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "writer_queue_depth",
            "Writes waiting for the group-commit writer",
            metrics.writer_queue_depth.clone(),
        );
        registry.register(
            "writer_batches",
            "Transactions committed by the writer",
            metrics.writer_batches.clone(),
        );
        registry.register(
            "writer_jobs",
            "Write requests run by the writer",
            metrics.writer_jobs.clone(),
        );
        registry.register(
            "login_rate_limited",
            "Logins and joins refused by the rate limiter",
            metrics.login_rate_limited.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// Records one finished request. A method outside the standard ones counts as `OTHER`,
    /// so a client inventing methods cannot grow the families (routes are the router's own).
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        const METHODS: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
        ];
        let method = METHODS
            .iter()
            .find(|m| **m == method)
            .copied()
            .unwrap_or("OTHER");
        self.requests
            .get_or_create(&RequestLabels {
                method,
                route: route.to_owned(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                method,
                route: route.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The connection gate's figures, taken just before a render.
    pub fn note_connections(&self, open: usize, refused: u64) {
        self.connections_open
            .set(i64::try_from(open).unwrap_or(i64::MAX));
        let counted = self.connections_refused.get();
        if refused > counted {
            self.connections_refused.inc_by(refused - counted);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_invented_methods_are_one_key() {
        let m = Metrics::default();
        m.observe("GET", "/x", 200, Duration::from_millis(3));
        m.observe("GET", "/x", 404, Duration::from_millis(300));
        let text = m.render();
        assert!(
            text.contains(
                "labrack_http_requests_total{method=\"GET\",route=\"/x\",status=\"200\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "labrack_http_requests_total{method=\"GET\",route=\"/x\",status=\"404\"} 1"
            )
        );
        assert!(
            text.contains("le=\"0.005\",method=\"GET\",route=\"/x\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("le=\"0.5\",method=\"GET\",route=\"/x\"} 2"),
            "{text}"
        );
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
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn gauges_and_counters_render_with_their_names() {
        let m = Metrics::default();
        m.writer_queue_depth.inc();
        m.writer_jobs.inc_by(3);
        m.note_connections(7, 5);
        m.note_connections(6, 4);
        let text = m.render();
        for line in [
            "labrack_writer_queue_depth 1",
            "labrack_writer_jobs_total 3",
            "labrack_connections_open 6",
            "labrack_connections_refused_total 5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
