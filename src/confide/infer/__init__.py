"""Protected inference outside the TCB: the model owner's tools (model_meta) and the untrusted
accelerator process (accelerator). The enclave side is confide.enclave.infer."""
