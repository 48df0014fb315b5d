"""The batch workflow: the steps a batch goes through, as plain `(event, deps) -> dict` functions.

Each step is a Lambda task of the Step Functions state machine on AWS and is called in-process by the
local runner. Steps are idempotent (a retry or a resume after a crash writes nothing twice) and pass
only ids, keys and byte ranges between them (Step Functions caps state at 256 KiB).

- `validate.validate_batch`: stream the input file once, check every line, plan chunks, write the
  manifest; the batch goes `in_progress` (or `failed` with line-numbered errors).
- `process.process_chunk`: send one chunk's requests upstream with bounded concurrency, journaling
  each result line as it completes; stops early on cancel, deadline or low Lambda time.
- `finalize.finalize_batch`: turn the journals into the output and error files, add never-ran lines,
  sum counts and usage, set the terminal status, publish the event.
- `finalize.fail_batch`: the catch-all when a step failed unexpectedly.
- `lines`: building and reading the output/error lines shared by the steps.
"""
