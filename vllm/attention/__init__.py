from vllm.attention.metadata import AttentionMetadata, build_metadata, allocate_kv_cache

__all__ = ["AttentionMetadata", "build_metadata", "allocate_kv_cache"]
