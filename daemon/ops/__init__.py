"""Operator tools and hardware readings: doctor, report, analysis, monitor, history, inventory. No torch at import."""
