"""An OpenAI-compatible Batch API: one core, run serverless on AWS or as one durable local process."""

__version__ = "0.1.0"
