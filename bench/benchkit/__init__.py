"""Helpers for bench/run.py: processes, targets, the wrk driver and the report."""
