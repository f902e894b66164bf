"""Tokenizers of bundles: the checkpoint's own, or a small one msc builds for random-weight models.

A bundle records its tokenizer in the manifest (`model.tokenizer`): the checkpoint folder's path,
relative to the bundle folder like `model.checkpoint`, when the checkpoint has tokenizer files (by
reference, like its weights; a checkpoint given at launch then brings its own), `"tokenizer"` (a folder
inside the bundle) for a random-weight model, or null when there is none (the server then takes token
ids only).
Either way it loads with transformers' `AutoTokenizer`, chat template included.

The small tokenizer is a byte-pair encoding trained (with the `tokenizers` library) on a short text that
ships with msc, to exactly the model's vocabulary size, with the model's begin/end-of-sequence ids given
to `<s>` / `</s>`. Its alphabet is printable ASCII plus newline and tab; any other character encodes as
`<unk>`. It makes text work end to end on random weights (the text it produces is, of course, noise).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from msc.errors import MscError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
SMALL_TOKENIZER_DIR = "tokenizer"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
ALPHABET = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
MIN_VOCAB = len(ALPHABET) + 3  # the alphabet and the three special tokens

# A chat template for the small tokenizer (Jinja, as transformers renders it): role markers as plain text.
SMALL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# NOTE: the training text only decides which merges the small tokenizer learns; it is written for this
# purpose (common English words and the chat markers), so that ordinary prompts take fewer tokens than
# characters.
_TRAINING_TEXT = """\
<|system|> <|user|> <|assistant|>
The quick brown fox jumps over the lazy dog. A mixture of experts model sends every token to a few of its
experts; the attention layers keep the key and value cache of every sequence. Serving a large model is
about keeping the accelerators busy: the attention side holds the cache, the expert side holds the weights,
and the two exchange tokens between layers. Hello, how are you today? I am fine, thank you. What is the
capital of France? The capital of France is Paris. Write a short poem about the sea and the sky.
Once upon a time there was a small town by the river, where people worked in the fields and in the mill.
def main():\n    print("hello world")\n    return 0\n
In the beginning of the year the weather was cold and the days were short, and then it became warm again.
one two three four five six seven eight nine ten eleven twelve 0 1 2 3 4 5 6 7 8 9 10 100 1000
Please answer the question below in one sentence. Thank you for your help with this request.
"""


def has_tokenizer_files(folder: str | Path) -> bool:
    folder = Path(folder)
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def build_small_tokenizer(vocab_size: int, bos_token_id: Any = None, eos_token_id: Any = None):
    """A PreTrainedTokenizerFast of exactly vocab_size tokens (see the module docstring); MscError when the
    vocabulary is too small to hold the alphabet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise MscError(f"a vocabulary of {vocab_size} tokens is too small for msc's text tokenizer (needs >= {MIN_VOCAB})")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # NOTE: a word keeps its leading space (" fox"), so decoding is a plain concatenation (decoders.Fuse)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]+|\s+"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS], initial_alphabet=ALPHABET,
                                  limit_alphabet=len(ALPHABET), min_frequency=1, show_progress=False)
    tok.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    # pad with unused placeholder tokens if the text had fewer merges than the vocabulary has room for
    n = len(vocab)
    while n < vocab_size:
        vocab[f"<unused{n}>"] = n
        n += 1
    # the model's own bos / eos ids go to <s> / </s>; every other token keeps its order
    pinned = {}
    for name, tid in ((BOS, _first_id(bos_token_id)), (EOS, _first_id(eos_token_id))):
        if tid is not None and 0 <= tid < vocab_size and tid not in pinned:
            pinned[tid] = name
    rest = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in pinned.values()]
    free_ids = [i for i in range(vocab_size) if i not in pinned]
    new_vocab = {name: tid for tid, name in pinned.items()} | dict(zip(rest, free_ids))
    data["model"]["vocab"] = new_vocab
    data["added_tokens"] = [{**t, "id": new_vocab[t["content"]]} for t in data["added_tokens"]]
    tok = Tokenizer.from_str(json.dumps(data))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS,
                                   chat_template=SMALL_CHAT_TEMPLATE, model_max_length=1 << 30)


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def record_tokenizer(stage: Path, hf_config, model_path: str | None, say=lambda msg: None, *,
                     bundle_dir: Path | None = None) -> str | None:
    """Decide a new bundle's tokenizer (the manifest's model.tokenizer) and, for a random-weight model,
    write the small one into the staging folder. None: no tokenizer (token ids only). bundle_dir: the
    bundle's final folder, which a checkpoint's tokenizer folder is recorded relative to."""
    if model_path is not None:
        if has_tokenizer_files(model_path):
            if bundle_dir is None:
                return str(Path(model_path).resolve())
            # NOTE: the same relative form as model.checkpoint (msc.compiler.relative_to_bundle), so that
            # tokenizer_dir can tell a tokenizer that is the checkpoint's own
            return os.path.relpath(Path(model_path).resolve(), Path(bundle_dir).resolve())
        say(f"the checkpoint {model_path} has no tokenizer files: the bundle serves token ids only")
        return None
    try:
        tok = build_small_tokenizer(hf_config.vocab_size, getattr(hf_config, "bos_token_id", None),
                                    getattr(hf_config, "eos_token_id", None))
    except MscError as e:
        say(f"no text tokenizer: {e}")
        return None
    tok.save_pretrained(stage / SMALL_TOKENIZER_DIR)
    return SMALL_TOKENIZER_DIR


def tokenizer_dir(bundle_dir: str | Path, manifest: dict, checkpoint: str | Path | None = None) -> Path | None:
    """The folder to load the bundle's tokenizer from, or None when it has none. `checkpoint`: the checkpoint
    given at launch; a bundle whose tokenizer is its checkpoint's takes that checkpoint's instead (None when
    it has no tokenizer files: token ids only)."""
    ref = manifest["model"].get("tokenizer")
    if ref is None:
        return None
    # NOTE: the tokenizer travels with the weights: recorded as the checkpoint's own folder, it follows --checkpoint
    if checkpoint is not None and ref == manifest["model"].get("checkpoint"):
        path = Path(checkpoint)
        if not has_tokenizer_files(path):
            log.warning("the checkpoint %s has no tokenizer files: serving token ids only", path)
            return None
        return path
    path = Path(ref) if Path(ref).is_absolute() else (Path(bundle_dir) / ref).resolve()
    if not path.is_dir():
        hint = "; pass --checkpoint PATH with the checkpoint folder" if ref == manifest["model"].get("checkpoint") else ""
        raise MscError(f"the bundle's tokenizer folder {path} does not exist (moved or deleted since compile?){hint}")
    return path


def load_tokenizer(bundle_dir: str | Path, manifest: dict, checkpoint: str | Path | None = None):
    """The bundle's tokenizer (transformers), or None when it has none; MscError when the recorded one
    cannot be loaded or does not fit the model's vocabulary. checkpoint: see tokenizer_dir."""
    path = tokenizer_dir(bundle_dir, manifest, checkpoint)
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 (any loader failure is reported with the folder)
        raise MscError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from None
    vocab = manifest["model"]["vocab_size"]
    if len(tok) > vocab:
        raise MscError(f"the tokenizer in {path} has {len(tok)} tokens but the model's vocabulary is {vocab}")
    return tok
