"""The shipped CLIP tokenizer must reproduce SD 1.5's exactly (ids printed in the source text)."""

import json

import pytest

from sdhelpers.build_tokenizer import NUM_MERGES, bytes_to_unicode, vocab_and_merges
from sdhelpers.models import TOKENIZER_DIR, load_tokenizer

SEED_PROMPT = "a photograph of an astronaut riding a horse"
SEED_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def encode(tokenizer, text):
    return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids


def test_vocabulary_is_clips(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)


def test_seed_prompt_gives_the_seed_ids(tokenizer):
    ids = encode(tokenizer, SEED_PROMPT)
    assert ids == SEED_IDS + [49407] * (77 - len(SEED_IDS))


def test_long_prompt_is_truncated_to_77_ending_in_eos(tokenizer):
    ids = encode(tokenizer, " ".join(["horse"] * 100))
    assert len(ids) == 77
    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:-1] == [4558] * 75


def test_empty_prompt_is_bos_then_76_pads(tokenizer):
    assert encode(tokenizer, "") == [49406] + [49407] * 76


def test_byte_map_is_a_bijection_on_256_bytes():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256


def test_shipped_files_match_the_recipe():
    """The committed vocab.json follows the recipe: bytes, bytes+</w>, merges in order, specials."""
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert len(merges) == NUM_MERGES
    fake_bpe = "header\n" + "\n".join(merges)
    rebuilt_vocab, rebuilt_merges = vocab_and_merges(fake_bpe)
    assert rebuilt_vocab == vocab
    assert rebuilt_merges == merges


def test_malformed_bpe_file_is_rejected():
    with pytest.raises(ValueError, match="bpe file"):
        vocab_and_merges("header\na b\nc d")
