"""Data helpers (graph benchmarks' protocol)."""
