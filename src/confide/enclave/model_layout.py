"""The external-weights layout of a sealed ONNX model, and the weight stream's frames (issue 9).

A model owner may upload a model in ONNX's own external-data layout (the official layout for
models over 2 GB: ``TensorProto.external_data`` with ``location``, ``offset``, ``length``), written
on their machine with ``onnx.save_model(..., save_as_external_data=True)``. The sealed plaintext is

    weights blob (bytes 0 .. weights_bytes) | graph: the ModelProto whose initializers point into it

and the header metadata (visible, authenticated by the header MAC and pinned by the manifest's
ciphertext digest) says where the graph is::

    "layout": {"format": "confide-onnx-external-v1", "location": "weights.bin",
               "weights_bytes": W, "graph_offset": W, "graph_bytes": G}

Every mode reads it: all-in-enclave and the outsourced modes get the whole plaintext and take
the weights from the offsets; ``split`` gets the graph only and each segment's weights through the
weight stream (``model_stream.py`` serves it in the enclave process, ``infer/split.py`` reads it in
the sandbox child).

The weight stream, child -> enclave: ``REQUEST`` (offset u64, length u32, big-endian), a byte range
of the weights region, at most ``MAX_READ`` bytes. Enclave -> child: ``REPLY`` (status u8, length
u32) then ``length`` bytes: the plaintext (status ``OK``) or a UTF-8 message (status ``REFUSED``,
after which the enclave closes the stream). Stdlib only: imported by the enclave process, the
sandbox child and the model owner's SDK.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from .errors import FormatError

LAYOUT_FORMAT = "confide-onnx-external-v1"
LOCATION = "weights.bin"  # the one external-data location a sealed model may name
REQUEST = struct.Struct(">QI")
REPLY = struct.Struct(">BI")
OK, REFUSED = 0, 1
MAX_READ = 1 << 20  # bytes per request: a larger tensor takes several
MAX_GRAPH_BYTES = 256 << 20  # the graph part alone (a graph with inline weights belongs inline)
MAX_MODEL_BYTES = 1 << 40
_FIELDS = ("format", "location", "weights_bytes", "graph_offset", "graph_bytes")


@dataclass(frozen=True)
class Layout:
    weights_bytes: int
    graph_offset: int
    graph_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format": LAYOUT_FORMAT,
            "location": LOCATION,
            "weights_bytes": self.weights_bytes,
            "graph_offset": self.graph_offset,
            "graph_bytes": self.graph_bytes,
        }


def _int(obj: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise FormatError(
            f"layout.{key} must be an integer in {lo}..{hi}, not {str(value)[:40]!r}", where=where
        )
    return value


def parse_layout(metadata: Any, *, where: str) -> Layout | None:
    """The external layout named in a model's header metadata, strictly checked; None for a model
    sealed whole (inline weights)."""
    if not isinstance(metadata, dict) or "layout" not in metadata:
        return None
    obj = metadata["layout"]
    if not isinstance(obj, dict) or sorted(obj) != sorted(_FIELDS):
        raise FormatError(
            f"layout must be an object with exactly the fields {', '.join(_FIELDS)}", where=where
        )
    if obj["format"] != LAYOUT_FORMAT or obj["location"] != LOCATION:
        raise FormatError(
            f"layout is not {LAYOUT_FORMAT} with location {LOCATION!r} (got {str(obj['format'])[:40]!r}, "
            f"{str(obj['location'])[:40]!r})",
            where=where,
        )
    weights = _int(obj, "weights_bytes", 0, MAX_MODEL_BYTES, where)
    offset = _int(obj, "graph_offset", 0, MAX_MODEL_BYTES, where)
    graph = _int(obj, "graph_bytes", 1, MAX_GRAPH_BYTES, where)
    if offset != weights:
        raise FormatError(
            f"layout.graph_offset {offset} must equal weights_bytes {weights} (the graph follows the weights)",
            where=where,
        )
    return Layout(weights, offset, graph)


def from_params(value: Any, *, where: str) -> Layout | None:
    """The layout as the enclave passes it to the child (params._enclave.model_layout)."""
    if value is None:
        return None
    return parse_layout({"layout": value}, where=where)
