"""Telemetry of the proxy: its own Prometheus metrics (:mod:`.metrics`), the catalogue of every
exported metric name (:mod:`.catalogue`), OpenTelemetry tracing (:mod:`.tracing`) and the JSON
access log (:mod:`.access_log`). Observers only: nothing here changes a request or its response."""
