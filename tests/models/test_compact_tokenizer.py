"""CompactTokenizer: lossless on any unicode, small, deterministic, persistent."""
import json
import random

import pytest

from cram_ray.models.tokenizer import SPECIALS, CompactTokenizer, gpt2_tokenizer

CORPUS = [
    "What colour is the shape? red",
    "How many circles are there? 3",
    "Read the word in the image. Answer with the word only.",
]


def random_unicode(rng: random.Random, n: int) -> str:
    """Random text mixing ASCII, whitespace runs, accents, CJK, emoji and control characters."""
    pools = [
        (0x20, 0x7E), (0x09, 0x0D), (0xC0, 0x17F), (0x370, 0x3FF), (0x4E00, 0x4FFF),
        (0x1F300, 0x1F64F), (0x0, 0x1F), (0xE000, 0xE0FF), (0x10000, 0x10FFFF),
    ]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        c = rng.randint(lo, hi)
        if 0xD800 <= c <= 0xDFFF:  # lone surrogates are not encodable text
            c = 0x41
        chars.append(chr(c))
    return "".join(chars)


@pytest.fixture(scope="module")
def tok() -> CompactTokenizer:
    return CompactTokenizer.build(CORPUS)


def test_round_trip_on_arbitrary_unicode(tok):
    rng = random.Random(0)
    samples = ["", " ", "\n\n", "  leading and trailing  ", "naïve café — 日本語 🎉🎉", "\x00\x7f\ud7ff\U0010ffff"]
    samples += [random_unicode(rng, rng.randint(1, 60)) for _ in range(300)]
    for s in samples:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert not set(ids) & {tok.pad_id, tok.bos_id, tok.eos_id, tok.image_token_id}
        assert tok.decode(ids) == s


def test_vocab_is_small_and_covers_the_corpus(tok):
    assert tok.vocab_size < 400  # 4 specials + 256 bytes + the corpus' tokens
    gpt2 = gpt2_tokenizer()
    corpus_tokens = {t for text in CORPUS for t in gpt2.encode(text).tokens}
    assert corpus_tokens <= set(tok.tokens)
    for text in CORPUS:  # corpus text encodes exactly as GPT-2 does: one compact id per GPT-2 token
        assert len(tok.encode(text)) == len(gpt2.encode(text).ids)


def test_unknown_tokens_fall_back_to_bytes(tok):
    word = " antidisestablishmentarianism"
    ids = tok.encode(word)
    assert len(ids) > len(gpt2_tokenizer().encode(word).ids)
    assert tok.decode(ids) == word


def test_specials_and_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_token_id) == (0, 1, 2, 3)
    assert tok.tokens[:4] == list(SPECIALS)
    ids = [tok.bos_id, tok.image_token_id, *tok.encode("red"), tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "red"
    assert tok.decode(ids, skip_special=False) == "<bos><image>red<eos><pad>"


def test_deterministic_and_json_round_trip(tok):
    again = CompactTokenizer.build(list(reversed(CORPUS)) + CORPUS[:1])
    assert again.to_json() == tok.to_json()
    assert again.encode(CORPUS[0]) == tok.encode(CORPUS[0])
    restored = CompactTokenizer.from_json(tok.to_json())
    assert restored == tok
    assert json.loads(tok.to_json())["format"].startswith("cram_ray.compact_gpt2")
    assert [restored.encode(t) for t in CORPUS] == [tok.encode(t) for t in CORPUS]


def test_bad_json_is_rejected():
    with pytest.raises(ValueError, match="format"):
        CompactTokenizer.from_json(json.dumps({"format": "other", "tokens": []}))


def test_fill_to_tops_up_with_gpt2s_most_frequent_printable_tokens(tok):
    filled = CompactTokenizer.build(CORPUS, fill_to=600)
    assert filled.vocab_size == 600
    assert set(tok.tokens) <= set(filled.tokens)  # the corpus' tokens stay
    vocab = gpt2_tokenizer().get_vocab()
    added = sorted(vocab[t] for t in set(filled.tokens) - set(tok.tokens))
    assert "Ġthe" in filled.tokens and "Ġand" in filled.tokens
    assert max(added) < 1000  # the lowest ids, i.e. GPT-2's earliest (most frequent) merges
    assert all(filled.decode([filled.tokens.index(t)]).strip().isprintable() for t in filled.tokens[260:])
    for text in CORPUS:
        assert filled.decode(filled.encode(text)) == text
