"""The untrusted host (`confide serve`): HTTP API, database, blob store, audit log, scheduler and the
pool of enclave workers, and the launcher of enclave processes (`enclave_process`). It relays
ciphertext, signed manifests, approvals and receipts; it never holds a plaintext key or plaintext
data, and nothing it says is trusted by the parties."""
