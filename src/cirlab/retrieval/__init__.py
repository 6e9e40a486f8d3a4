"""Retrieval: the feature cache, gallery indexes (faiss, Milvus) and composed search over them."""
