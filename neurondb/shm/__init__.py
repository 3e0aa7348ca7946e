"""Shared memory of one installation: segments, robust locks, latches, the control block.

See `control.py` for the layout, `lock.py` for what happens when a holder is killed, `segment.py`
for why numpy views never outlive their mapping and why the resource tracker cannot unlink a segment.
"""

from neurondb.shm.control import (
    SHUTDOWN_MODES,
    WORKER_STATES,
    SharedState,
    TenantTableFull,
    get_text,
    heartbeat,
    set_text,
    state_code,
    state_name,
)
from neurondb.shm.latch import Latch, attach_latches, create_latches, latch_name, unlink_latches
from neurondb.shm.lock import RobustLock
from neurondb.shm.names import instance_prefix, list_objects, object_name, unlink_all
from neurondb.shm.segment import GenerationReader, Segment, generation_name, publish_generation

__all__ = [
    "SHUTDOWN_MODES",
    "WORKER_STATES",
    "GenerationReader",
    "Latch",
    "RobustLock",
    "Segment",
    "SharedState",
    "TenantTableFull",
    "attach_latches",
    "create_latches",
    "generation_name",
    "get_text",
    "heartbeat",
    "instance_prefix",
    "latch_name",
    "list_objects",
    "object_name",
    "publish_generation",
    "set_text",
    "state_code",
    "state_name",
    "unlink_all",
    "unlink_latches",
]
