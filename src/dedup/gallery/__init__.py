"""Where registrations live: the Gallery interface (base.py) and its two implementations,
embedded/ (LMDB + FAISS in one process) and milvus/ (stateless nodes over Milvus)."""
