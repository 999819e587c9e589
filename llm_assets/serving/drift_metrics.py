"""The latest drift report as Prometheus gauges, read at each scrape of the server's `/metrics`, so
an alert rule can fire on drift (monitoring/alerts.yml, `LLMDriftDetected`).

    >>> import tempfile
    >>> from pathlib import Path
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> from llm_assets.serving.drift_metrics import DriftCollector
    >>> report_dir = Path(tempfile.mkdtemp()) / "drift_report"      # data/lake/drift_report
    >>> registry = CollectorRegistry()
    >>> registry.register(DriftCollector(report_dir))
    >>> b"llm_drift_detected" in generate_latest(registry)          # no report yet: no gauge
    False

Gauges, present once `drift_report` has written a report:
- `llm_drift_detected` (1 drift, 0 none) and `llm_drift_share` (share of drifted columns) of the
  latest report, labelled with its `source` (serving, or incoming_batch:<key>);
- `llm_drift_report_timestamp_seconds`: when that report was written;
- `llm_drift_detected_by_version{model_version, route}` and `llm_drift_share_by_version`: the
  release's and the canary's own windows, when the report split the traffic by version.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from llm_assets.lib.monitor.drift import SUMMARY, read_summary


class DriftCollector:
    """A prometheus_client custom collector over `report_dir` (drift_report's artifact directory)."""

    def __init__(self, report_dir: Path):
        self.report_dir = Path(report_dir)

    def collect(self):
        path = self.report_dir / SUMMARY
        if not path.is_file():
            return
        stamp, summary = path.stat().st_mtime, read_summary(self.report_dir)
        source = str(summary.get("source", ""))
        for name, doc, value in (("llm_drift_detected", "1 when the latest drift report found drift", summary["drift_detected"]),
                                 ("llm_drift_share", "Share of drifted columns in the latest drift report", summary["drift_share"])):
            gauge = GaugeMetricFamily(name, doc, labels=["source"])
            gauge.add_metric([source], float(value))
            yield gauge
        yield GaugeMetricFamily("llm_drift_report_timestamp_seconds", "When the latest drift report was written", value=stamp)
        by_version = summary.get("by_version") or {}
        detected = GaugeMetricFamily("llm_drift_detected_by_version", "Drift in one version's traffic (release or canary)",
                                     labels=["model_version", "route"])
        share = GaugeMetricFamily("llm_drift_share_by_version", "Share of drifted columns in one version's traffic",
                                  labels=["model_version", "route"])
        for version, figures in by_version.items():
            if "drift_detected" in figures:  # a version with too few rows has no figures, only its row count
                detected.add_metric([version, figures["route"]], float(figures["drift_detected"]))
                share.add_metric([version, figures["route"]], float(figures["drift_share"]))
        if by_version:
            yield detected
            yield share
