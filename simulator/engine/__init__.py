"""A serving instance that mirrors vLLM v1: Scheduler -> KVCacheManager -> BlockPool."""
