"""Operations on data and deployments: doctor, backup, bulk and photo import, migration to
Milvus, test keys, cluster export."""
