"""The chunk plan of a batch (`batches/{id}/manifest.json`): written by validate, read by the local
runner and finalize; on AWS the Distributed Map iterates it."""

from __future__ import annotations

import orjson

from batch_api import object_keys
from batch_api.contract.models import ChunkPlan
from batch_api.deps import Deps


def write_manifest(deps: Deps, batch_id: str, chunks: list[ChunkPlan]) -> None:
    deps.blobs.put(object_keys.manifest_key(batch_id), orjson.dumps([chunk.model_dump() for chunk in chunks]))


def load_manifest(deps: Deps, batch_id: str) -> list[ChunkPlan]:
    """The chunk plan validate wrote. `KeyError` if there is none."""
    return [
        ChunkPlan.model_validate(item)
        for item in orjson.loads(deps.blobs.get(object_keys.manifest_key(batch_id)))
    ]
