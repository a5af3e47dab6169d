"""Developer tools: `python -m tools.sandbox` (a sandbox and a benchmark with no accounts)."""
