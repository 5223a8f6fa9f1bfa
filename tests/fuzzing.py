"""Hypothesis settings for the fuzz tests: a fixed number of derandomised examples (CI runs the same
cases every time), no example database, and no per-example time limit (a slow CI machine must not fail
a fuzz test; timings belong in benchmarks/)."""

from hypothesis import HealthCheck, settings

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
