"""The synthetic model's tokenizer: a byte-level BPE trained on local text, with a chat template.

Owns the special tokens and their ids, the ChatML-style template, the training corpus (the Python
standard library's sources: nothing is downloaded) and the filler tokens that make every model id
decode to visible text. It must not build weights or write the model directory
(:mod:`model_server.synth` does).
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(5)

# ChatML-style template (what Qwen uses); works for every preset because the tokens are ours.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class SynthError(Exception):
    """A one-line, user-facing error of ``model-server synth`` (raised here and by :mod:`model_server.synth`)."""


def corpus_files(max_bytes: int) -> list[str]:
    """Local text to train the tokenizer on: the stdlib's ``*.py`` files, sorted, up to ``max_bytes``."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    if not files:  # fall back to our own sources
        files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "**", "*.py"), recursive=True))
    chosen, total = [], 0
    for f in files:
        try:
            size = os.path.getsize(f)
        except OSError:
            continue
        chosen.append(f)
        total += size
        if total >= max_bytes:
            break
    if not chosen:
        raise SynthError("no local text found to train the tokenizer on")
    return chosen


def _filler_word(k: int) -> str:
    """A short lowercase pseudo-word for filler token ``k`` (bijective base 26)."""
    letters = []
    k += 1
    while k > 0:
        k, r = divmod(k - 1, 26)
        letters.append(chr(ord("a") + r))
    return "".join(reversed(letters))


def fill_vocab(tok, target: int):
    """Extend a trained byte-level BPE to exactly ``target`` ids with unreachable filler tokens.

    Filler ids are never produced by encoding (no merges lead to them) but decode to a space plus a
    pseudo-word, so every id a random model can emit decodes to visible text (a stream of empty
    chunks would look like no content to clients and proxies).
    """
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    k = 0
    while next_id < target:
        word = "\u0120" + _filler_word(k)          # "Ġ" is the byte-level form of a space
        k += 1
        if word in vocab:
            continue
        vocab[word] = next_id
        next_id += 1
    return Tokenizer.from_str(json.dumps(data))


def train_tokenizer(vocab_size: int, max_bytes: int, fill_to: int | None = None):
    """Train a byte-level BPE tokenizer; returns a transformers fast tokenizer with a chat template.

    ``fill_to``: extend the vocabulary to this many ids with filler tokens (see :func:`fill_vocab`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(corpus_files(max_bytes), trainer)
    if fill_to is not None and fill_to > tok.get_vocab_size():
        tok = fill_vocab(tok, fill_to)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", additional_special_tokens=SPECIAL_TOKENS[3:])
    hf.chat_template = CHAT_TEMPLATE
    hf.model_max_length = 1 << 30
    return hf
