"""The OpenAI wire contract: models, error codes and constants, shared by every other layer."""
