"""Bundle tokenizers (msc.tokenizer) and streaming detokenization with stop strings (msc.detokenize)."""
from __future__ import annotations

import random

import pytest

from msc.detokenize import TextStream
from msc.errors import MscError
from msc.tokenizer import MIN_VOCAB, build_small_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def small():
    return build_small_tokenizer(256, bos_token_id=1, eos_token_id=2)


def test_the_small_tokenizer_fills_the_vocabulary_and_pins_the_models_special_ids(small):
    assert len(small) == 256 and sorted(small.get_vocab().values()) == list(range(256))
    assert (small.bos_token_id, small.eos_token_id) == (1, 2)
    other = build_small_tokenizer(128, bos_token_id=0, eos_token_id=1)
    assert len(other) == 128 and (other.bos_token_id, other.eos_token_id) == (0, 1)
    with pytest.raises(MscError, match="too small"):
        build_small_tokenizer(MIN_VOCAB - 1)


def test_the_small_tokenizer_round_trips_ascii_text_and_compresses_it(small):
    text = "Hello, how are you today?\n\tdef main():  return 42"
    ids = small(text, add_special_tokens=False).input_ids
    assert small.decode(ids) == text and len(ids) < len(text)
    assert all(0 <= i < 256 for i in ids)
    assert "<unk>" in small.decode(small("é", add_special_tokens=False).input_ids)  # outside the alphabet


def test_the_small_tokenizers_chat_template_renders_roles(small):
    text = small.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nHi</s>\n<|assistant|>\n"


def test_a_random_weight_bundle_carries_the_small_tokenizer(tiny_bundle):
    assert tiny_bundle.manifest["model"]["tokenizer"] == "tokenizer"
    tok = load_tokenizer(tiny_bundle.path, tiny_bundle.manifest)
    assert len(tok) == tiny_bundle.manifest["model"]["vocab_size"] and tok.eos_token_id == 2


def test_a_missing_or_oversized_tokenizer_is_a_clear_error(tiny_bundle, tmp_path):
    manifest = {"model": {**tiny_bundle.manifest["model"], "tokenizer": str(tmp_path / "gone")}}
    with pytest.raises(MscError, match="does not exist"):
        load_tokenizer(tiny_bundle.path, manifest)
    big = build_small_tokenizer(300)
    big.save_pretrained(tmp_path / "big")
    manifest = {"model": {**tiny_bundle.manifest["model"], "tokenizer": str(tmp_path / "big")}}
    with pytest.raises(MscError, match="300 tokens but the model's vocabulary is 256"):
        load_tokenizer(tiny_bundle.path, manifest)
    assert load_tokenizer(tiny_bundle.path, {"model": {"tokenizer": None}}) is None


def _byte_level(text: str = "wörds ünïcödé 🙂 and plain words "):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([text * 10], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.mark.parametrize("which", ["small", "byte_level"])
def test_streamed_text_equals_decoding_the_whole_output(small, which):
    tok = small if which == "small" else _byte_level()
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))]
        ts, out, i = TextStream(tok), "", 0
        while i < len(ids):
            k = rng.randrange(1, 4)
            piece = ts.add(ids[i:i + k])
            assert "\ufffd" not in piece or "\ufffd" in tok.decode(ids, skip_special_tokens=True)
            out, i = out + piece, i + k
        assert out + ts.finish() == tok.decode(ids, skip_special_tokens=True)


def test_multibyte_characters_are_held_until_complete():
    tok = _byte_level("plain words only ")  # no merges inside the emoji: one token per byte
    ids = tok("🙂", add_special_tokens=False).input_ids
    assert len(ids) == 4
    ts = TextStream(tok)
    pieces = [ts.add([t]) for t in ids]
    assert "".join(pieces) + ts.finish() == "🙂" and all(p in ("", "🙂") for p in pieces)


def test_stop_strings_cut_the_text_and_hold_back_what_could_start_one(small):
    ids = small("Hello, how are you today?", add_special_tokens=False).input_ids
    ts = TextStream(small, stop=["are you", "zzz"])
    out = ""
    for t in ids:
        out += ts.add([t])
        assert not out.endswith("ar")  # a possible start of "are you" is never handed out early
        if ts.stopped:
            break
    assert ts.stopped and out + ts.finish() == "Hello, how "
    ts = TextStream(small, stop=["zzz"])
    assert "".join(ts.add([t]) for t in ids) + ts.finish() == "Hello, how are you today?" and not ts.stopped
