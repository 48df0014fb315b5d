"""Webhooks: terminal batch events signed as OpenAI signs them (Standard Webhooks), and their delivery.

- `events.py`: the event a terminal status produces (stable id, OpenAI's body) and its signature.
- `endpoints.py`: the configured endpoints (URL, `whsec_` secret, project) and who gets what.
- `policy.py`: the delivery policy: what counts as delivered, the backoff, the 72-hour window.
- `sender.py`: one HTTP attempt (no redirects, bodies ignored, a timeout), with the address guard.
- `outbox.py`: the local deliverer over a durable outbox; `queue.py`: the AWS delivery over SQS.
"""
