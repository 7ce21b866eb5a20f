"""Protected inference for SDK users: a task for the ``infer`` built-in, and the words an approver
reads about what such a task reveals to whom.

The model is a dataset of its owner (``Client.upload_model``): like every input, the enclave opens it
only with its owner's approval of the exact manifest, so a model never runs on data its owner did
not approve, and the data never meets a model its owners did not approve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from confide.enclave.errors import ConfideError
from confide.enclave.manifest import Manifest

if TYPE_CHECKING:
    from confide.client.sdk import Client

# the modes platform tasks run (docs/inference/); the outsourced ones need a host with an accelerator
# (`confide serve --accelerator`), else the enclave refuses the task before anything runs; split
# needs a model uploaded in the external-weights layout (upload_model(..., layout="external"))
MODES = ("all-in-enclave", "outsourced-verified", "outsourced-blinded+verified", "split")


def infer(
    client: Client,
    *,
    model: str,
    data: str,
    recipients: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
    mode: str = "all-in-enclave",
    reply_timeout_s: float | None = None,
    report: bool = False,
    **task: Any,
) -> str:
    """Create an ``infer`` task: the model (a reference from `upload_model`) on `data` (a reference
    to an uploaded .npz/.npy), output ``outputs`` (.npz) sealed to `recipients` (default: this
    client). Returns the task id; the model's owner and the data's owner must approve it.
    `report` (mode split): also the ``report`` output (JSON sizes of the run), to the same recipients."""
    if mode not in MODES:
        raise ConfideError(
            f"mode must be one of {', '.join(MODES)} for platform tasks, got {mode!r}", where="infer"
        )
    params: dict[str, Any] = {"mode": mode}
    if reply_timeout_s is not None:  # outsourced modes: seconds to wait for each accelerator reply
        params["reply_timeout_s"] = reply_timeout_s
    if outputs is not None:
        params["outputs"] = list(outputs)
    to = list(recipients) if recipients is not None else [client.fingerprint]
    if report and mode != "split":
        raise ConfideError("the report output is written only in mode split", where="infer")
    return client.create_task(
        function="infer",
        inputs={"model": model, "data": data},
        outputs={"outputs": to, "report": to} if report else {"outputs": to},
        params=params,
        **task,
    )


def describe(m: Manifest, clean: Callable[[str], str] = str) -> list[str]:
    """Lines for the approval text of an infer task: the mode, and what it reveals to whom."""
    fn = m.function
    if fn.kind != "builtin" or fn.name != "infer":
        return []
    mode = m.params.get("mode", "all-in-enclave")
    owners = {i.name: clean(m.name_of(i.owner)) for i in m.inputs}
    to = ", ".join(clean(m.name_of(r)) for o in m.outputs for r in o.recipients)
    lines = [f"What runs and what it reveals (infer, mode {clean(str(mode))}):"]
    if mode == "all-in-enclave":
        lines += [
            f"  the model of {owners.get('model', '?')} and the data of {owners.get('data', '?')} are "
            "decrypted only in the enclave, in the sandbox where ONNX Runtime runs; no accelerator and "
            "no other party sees either",
            f"  outputs -> {to}: the model's outputs on that data (which tell about both the model and the data)",
            "  everyone sees the model's visible metadata (input/output names and shapes, parameter "
            "count, FLOPs, size); the host sees the run's duration and each output's size",
        ]
    elif mode in ("outsourced-verified", "outsourced-blinded+verified"):
        model, data = owners.get("model", "?"), owners.get("data", "?")
        lines += [
            f"  the model of {model} is decrypted in the enclave, and its linear layers' weights "
            "(MatMul, Gemm, Conv), quantized to 8 bits, are sent in clear to the host's untrusted "
            f"accelerator: the host learns {model}'s weights (up to rounding); the rest of the model "
            "(biases, activations, graph order) stays in the enclave",
        ]
        if mode == "outsourced-verified":
            lines.append(
                f"  integrity only: the accelerator also sees the data of {data} in clear, as the "
                "quantized input of every linear layer (and every intermediate activation)"
            )
        else:
            lines.append(
                f"  the data of {data} is hidden from the accelerator: every value it receives is "
                "blinded with a fresh random mask in a prime field (uniformly random to it)"
            )
        lines += [
            "  every product the accelerator returns is checked in the enclave (Freivalds: a wrong "
            "product passes with probability below 3.6e-15) before use; a wrong one stops the task and "
            "nothing is released",
            f"  outputs -> {to}: the model's outputs on that data, within the quantization error",
            f"  the enclave waits at most {clean(str(m.params.get('reply_timeout_s', 120)))} s for each "
            "accelerator reply; a slower or broken accelerator fails the task",
            "  the host also sees the layer shapes, the number and size of the messages, the timing "
            "of every layer, and the run's duration and output sizes",
        ]
    elif mode == "split":
        model, data = owners.get("model", "?"), owners.get("data", "?")
        lines += [
            f"  the model of {model} (uploaded in the external-weights layout) runs in the enclave as "
            "consecutive submodels that each fit the enclave's memory budget, in ONNX Runtime in the "
            f"sandbox; the data of {data} and the activations stay in the enclave; no accelerator "
            "sees anything",
            "  the enclave decrypts only the graph, then each submodel's weights chunk by chunk as it "
            "needs them (every chunk checked against the approved file), and frees them after it",
            f"  outputs -> {to}: the model's outputs on that data (which tell about both the model and the data)",
            "  the host sees which byte ranges of the sealed model are read and when: the layer "
            "boundaries, which layers' weights each submodel holds, and each submodel's time; "
            "nothing of the data",
            "  everyone sees the model's visible metadata (input/output names and shapes, parameter "
            "count, FLOPs, size, the weights' and the graph's sizes); the host sees the run's "
            "duration and each output's size",
        ]
        if any(o.name == "report" for o in m.outputs):
            lines.append(
                "  report -> its recipients: the submodels' count, weight and activation bytes and "
                "the run's peak memory (sizes of the model and the batch)"
            )
    else:
        lines.append("  this mode is not available for platform tasks: the enclave will refuse the task")
    return lines


__all__ = ["MODES", "describe", "infer"]
