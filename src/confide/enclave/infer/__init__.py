"""Protected DNN inference, the enclave side (issue 9): Slalom-style outsourcing of linear layers.

- ``field``: the two prime fields, CSPRNG sampling, exact modular matrix products with explicit
  float64/int64 bounds (an operand that could overflow raises, nothing wraps silently);
- ``slalom``: fixed-point quantization, blinding with fresh masks, unblinding factors r·W and
  Freivalds vectors precomputed in an offline phase inside the enclave, every outsourced product
  checked before use (a wrong one fails closed, naming the layer);
- ``wire``: the framed protocol to the untrusted accelerator process (``confide.infer.accelerator``);
- ``executor``: runs an ONNX graph in numpy, its linear layers (MatMul, Gemm, Conv, ConvTranspose)
  outsourced;
- ``ops``: the operators that always run inside, every node and tensor checked as hostile input.

Where this runs: only in the sandbox child (and in tests and benchmarks), never in the enclave
process, because it imports numpy and onnx (tests/test_tcb_imports.py allows them in this folder
and tests/test_infer_tcb.py checks that no other enclave module imports it). Like enclave/builtins,
these files are part of the measured TCB tree.
"""
