"""Providers that need no download and no network, so a fresh install embeds and reranks offline.

`HashEmbedder` is the feature-hashing trick (Weinberger et al. 2009) over word unigrams, word bigrams and
character 3-5-grams of each word (fastText-style, with < > word boundaries), so that "embedding" and
"embeddings" or a typo still share most features. It is lexical, not semantic: good enough for
near-duplicate detection and keyword-ish search, and the default only because it is always available.

Hashes come from blake2b with a fixed personalisation, never Python's `hash()`, which is salted per
process: a vector stored by one worker must equal the one another worker computes for the same text
tomorrow. Changing the features or weights changes every vector, so it would need a new model name.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from collections import Counter
from hashlib import blake2b

import numpy as np

from neurondb.providers.base import Embedder, Reranker, check_texts, check_top_n, invalid_input

_WORD = re.compile(r"\w+")
_PERSON = b"neurondb-hash-v1"  # blake2b personalisation: the feature space's version
_CHAR_NGRAMS = (3, 4, 5)
# Relative weights of the feature groups. A word yields about 15 character n-grams whose signed
# contributions add up roughly in quadrature, so 0.35 each makes a word's spelling weigh a little more
# than the word itself (inflections and typos still match); bigrams add word order without dominating.
# Chosen on pairs like "embedding vectors" / "embeddings vector" (0.39) vs unrelated texts (~0.02).
_W_WORD, _W_BIGRAM, _W_CHAR = 1.0, 0.5, 0.35
_CACHE_LIMIT = 200_000  # words whose features are kept; natural text repeats a small vocabulary


def tokenize(text: str) -> list[str]:
    """Lowercased Unicode word tokens (NFKC first, so full-width and ligature forms match plain ones)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _hash64(features: list[bytes]) -> np.ndarray:
    """Stable 64-bit hashes of `features`, in one numpy array (one join instead of n int conversions)."""
    return np.frombuffer(
        b"".join(blake2b(f, digest_size=8, person=_PERSON).digest() for f in features), dtype="<u8"
    )


class HashEmbedder(Embedder):
    """Deterministic lexical embeddings: signed feature hashing, sublinear TF (1 + ln tf), L2-normalised.

    Identical texts give identical vectors in every process and on every machine; texts sharing words or
    spellings get a high cosine. A text with no word characters gets the zero vector.
    """

    name = "local"

    def __init__(self, dim: int = 384) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 8 <= dim <= 65536:
            raise invalid_input("local", f"hash embedder dimension must be an integer in 8..65536, got {dim!r}")
        self.dim = dim
        self.model = f"hash-{dim}"
        # word -> (feature hashes, feature weights) of its unigram and character n-grams
        self._words: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __repr__(self) -> str:
        return f"HashEmbedder(dim={self.dim})"

    def _word_features(self, word: str) -> tuple[np.ndarray, np.ndarray]:
        cached = self._words.get(word)
        if cached is not None:
            return cached
        marked = f"<{word}>"
        feats = [b"w\x00" + word.encode()]
        for n in _CHAR_NGRAMS:
            feats.extend(b"c\x00" + marked[i:i + n].encode() for i in range(len(marked) - n + 1))
        weights = np.full(len(feats), _W_CHAR, dtype=np.float32)
        weights[0] = _W_WORD
        entry = (_hash64(feats), weights)
        if len(self._words) >= _CACHE_LIMIT:
            self._words.clear()
        self._words[word] = entry
        return entry

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = check_texts(self.name, texts)
        n, dim = len(texts), self.dim
        hashes: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        lengths = np.zeros(n, dtype=np.int64)
        for row, text in enumerate(texts):
            words = tokenize(text)
            count = 0
            for word in words:
                h, w = self._word_features(word)
                hashes.append(h)
                weights.append(w)
                count += len(h)
            if len(words) > 1:
                bigrams = [b"b\x00" + f"{a} {b}".encode() for a, b in itertools.pairwise(words)]
                hashes.append(_hash64(bigrams))
                weights.append(np.full(len(bigrams), _W_BIGRAM, dtype=np.float32))
                count += len(bigrams)
            lengths[row] = count
        out = np.zeros((n, dim), dtype=np.float32)
        if not hashes:
            return out
        h = np.concatenate(hashes)
        w = np.concatenate(weights)
        rows = np.repeat(np.arange(n, dtype=np.uint64), lengths)
        # Term frequency per (text, feature): group equal features of one row. The row number replaces
        # the hash's low 24 bits in the grouping key (rows < 2^24 per call), which leaves 40 bits to tell
        # features of one text apart: a merge of two of them is ~1e-9 likely and would only nudge a weight.
        if n >= 1 << 24:
            raise invalid_input(self.name, f"too many texts in one call ({n}); split the batch")
        key = ((h >> np.uint64(24)) << np.uint64(24)) | rows
        _, first, counts = np.unique(key, return_index=True, return_counts=True)
        hf = h[first]
        tf = (1.0 + np.log(counts)).astype(np.float32) * w[first]
        sign = 1.0 - 2.0 * (hf >> np.uint64(63)).astype(np.float32)
        bucket = (hf % np.uint64(dim)).astype(np.int64)
        flat = rows[first].astype(np.int64) * dim + bucket
        out = np.bincount(flat, weights=sign * tf, minlength=n * dim).astype(np.float32).reshape(n, dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


class BM25Reranker(Reranker):
    """Okapi BM25 over the candidate documents themselves (they are the collection for IDF and average
    length), which is what a reranker sees: a query and a few dozen candidates, no corpus statistics.

    IDF is Lucene's ln(1 + (N - df + 0.5) / (df + 0.5)), always positive so a term present in every
    candidate still counts a little. Ties keep the candidates' original order.
    """

    name = "local"
    model = "bm25"

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b

    def __repr__(self) -> str:
        return f"BM25Reranker(k1={self.k1}, b={self.b})"

    def rerank(self, query: str, documents: list[str], top_n: int | None = None) -> list[tuple[int, float]]:
        if not isinstance(query, str):
            raise invalid_input(self.name, f"query must be a string, got {type(query).__name__}")
        documents = check_texts(self.name, documents)
        limit = check_top_n(self.name, top_n, len(documents))
        if not documents:
            return []
        terms = set(tokenize(query))
        docs = [Counter(tokenize(d)) for d in documents]
        lengths = [sum(c.values()) for c in docs]
        n = len(docs)
        avgdl = (sum(lengths) / n) or 1.0
        idf = {}
        for term in terms:
            df = sum(1 for c in docs if term in c)
            idf[term] = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
        scores = []
        for counts, length in zip(docs, lengths, strict=True):
            norm = self.k1 * (1.0 - self.b + self.b * length / avgdl)
            score = 0.0
            for term in terms:
                tf = counts.get(term)
                if tf:
                    score += idf[term] * tf * (self.k1 + 1.0) / (tf + norm)
            scores.append(score)
        order = sorted(range(n), key=lambda i: (-scores[i], i))
        return [(i, scores[i]) for i in order[:limit]]
