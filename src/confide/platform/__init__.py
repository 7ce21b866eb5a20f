"""The untrusted platform (`confide serve`): HTTP API, database, blob store, audit log and the pool of
enclave workers. It relays ciphertext, signed manifests, approvals and receipts; it never holds a
plaintext key or plaintext data, and nothing it says is trusted by the parties."""
