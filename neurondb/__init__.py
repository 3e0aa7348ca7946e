"""neurondb: four background workers for PostgreSQL (queue, auto-tuner, index maintenance, LLM jobs)."""

__version__ = "0.1.0"
