"""Adapters: the only code that talks to storage, queues and the cloud."""
