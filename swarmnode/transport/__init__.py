"""Moving parameters: the wire format and the two gRPC APIs.

* :mod:`.serde` - canonical safetensors bytes, SHA-256 digests, hostile-input-safe decoding (the
  only module that knows the parameter wire format);
* :mod:`.peer` - the peer API between node services, mutual TLS bound to on-chain identities;
* :mod:`.local` - the local API between a training script and its node service.
"""
