"""The client commands of `batch-api` (submit, status, wait, download, cancel, ls, files), built on
the `openai` SDK: they work against any OpenAI-compatible Batch API, this one (local or on AWS) and
api.openai.com alike. They need the `cli` extra (`pip install -e '.[cli]'` in a checkout); the server
does not.

`parser` and the pure modules (`exit_codes`, `inputs`) import only the standard library, so
`batch-api serve` builds its parser without the SDK; `commands` and `display` are imported when a
client command runs.
"""
