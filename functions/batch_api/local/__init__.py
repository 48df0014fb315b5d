"""The local twin: `batch-api serve`, one durable process in front of the same API handler."""
