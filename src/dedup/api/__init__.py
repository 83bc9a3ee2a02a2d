"""The gRPC layer: servicers, protobuf conversion, the wire (decoding, admission), status
mapping, authentication and observability. Knows no gallery implementation."""
