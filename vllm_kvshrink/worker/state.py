"""The compactor of this worker process (one model runner per process)."""

COMPACTOR = None
