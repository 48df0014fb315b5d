"""Use cases of the Files, Uploads and Batches APIs.

Plain functions of (deps, project_id, plain values) that return stored records (or wire dicts) and
raise `contract.errors` domain errors. Nothing here knows about HTTP; `handlers/api.py` does.
"""
