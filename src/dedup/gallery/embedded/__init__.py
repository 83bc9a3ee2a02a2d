"""The embedded gallery: LMDB, the source of truth, and a FAISS index derived from it."""
