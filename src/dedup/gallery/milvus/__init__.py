"""The Milvus backend (needs pymilvus, imported on first use): the gallery, and the audit
chains read back for `dedup audit --milvus-uri`."""

from dedup.gallery.milvus.audit import read_audit_chains
from dedup.gallery.milvus.gallery import MilvusGallery

__all__ = ["MilvusGallery", "read_audit_chains"]
