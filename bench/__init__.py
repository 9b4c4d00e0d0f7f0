"""Benchmarks and throw-away reference servers (Postfix) for relayhub; not installed."""
