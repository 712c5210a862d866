"""Model-independent engine core: the scheduler and the KV-cache block manager."""
