"""The files `sentiment-ray eval` writes (into --output, by default the folder it read):
under their own names, so a report never replaces the label job's report.html."""

REPORT_FILE = "eval-report.html"
METRICS_FILE = "eval-metrics.json"
