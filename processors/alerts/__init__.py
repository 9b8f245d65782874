"""Alerts for city departments: rules over anomalies, lifecycle, routing, CAP 1.2."""
