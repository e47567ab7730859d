"""Replay agent traces through the simulator or a live OpenAI-compatible server, into one
results layout (calls.csv, programs.csv, timeseries.csv, summary.json)."""
