"""Service logic on validated input: verdicts, enrolment, erasure, investigations, cluster
sweeps and the audit trail, through the Gallery interface; no gRPC."""
