"""The four workers of the document. Each module is one worker; `base` is the lifecycle they share."""

from neurondb.workers.base import Worker
from neurondb.workers.defrag import DefragWorker
from neurondb.workers.llm import LLMWorker
from neurondb.workers.queue import QueueWorker
from neurondb.workers.tuner import TunerWorker

WORKER_KINDS: dict[str, type[Worker]] = {
    "neuranq": QueueWorker,
    "neuranmon": TunerWorker,
    "neurandefrag": DefragWorker,
    "neuranllm": LLMWorker,
}
