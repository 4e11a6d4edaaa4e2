//! The Prometheus exporter every command of this binary installs.
/// Buckets (seconds) of the latency histograms, so Prometheus gets histograms it can aggregate
/// across instances (`histogram_quantile`) instead of per-process summaries.
pub const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// A Prometheus builder with those buckets for every `*_seconds` histogram of the project.
pub fn prometheus_builder() -> metrics_exporter_prometheus::PrometheusBuilder {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .expect("non-empty buckets")
}
