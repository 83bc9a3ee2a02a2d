"""Plain values every layer shares: errors, records, settings, the verdict policy, vectors,
validation, the audit-chain and adjudication record formats. Imports nothing else of dedup
and no gRPC, storage, index, Milvus or image code."""
