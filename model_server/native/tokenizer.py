"""A tokenizer over ``tokenizers.Tokenizer`` with the surface the server uses, without transformers.

For a model directory whose ``tokenizer_config.json`` names the plain fast tokenizer
(``TokenizersBackend`` / ``PreTrainedTokenizerFast``) of a Llama-type model, transformers' ``AutoTokenizer``
loads ``tokenizer.json`` as it is and changes nothing in it when every special token it names is already
one of the file's added tokens; then :class:`NativeTokenizer` is the same tokenizer: ``tok(text,
add_special_tokens=...)["input_ids"]`` (``encode_batch``: the Rust side works without the GIL; special tokens
as ``tokenizer.json``'s post-processor adds them), ``decode`` (``skip_special_tokens``; the
``clean_up_tokenization_spaces`` clean-up for non-BPE models, as transformers does), ``backend_tokenizer``,
``get_vocab``, the special tokens and their ids (``all_special_ids``: named ones, then the extra ones),
``model_max_length``, ``chat_template`` / ``apply_chat_template`` (:mod:`.chat_template`).

:func:`from_dir` refuses (:class:`NativeTokenizerUnsupported`, with the reason) whatever transformers would
build or change differently: another tokenizer class (Qwen2's rebuilds its pre-tokenizer, Llama 2's is
SentencePiece), remote code, a special token that is not an added token, added tokens whose flags differ from
``tokenizer.json``'s, legacy ``special_tokens_map.json`` / ``added_tokens.json`` merges, split special
tokens, several chat templates. Owns the wrapper and that check.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from . import chat_template

CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
VERY_LARGE_INTEGER = int(1e30)          # transformers' model_max_length when the config gives none
_FLAGS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


class NativeTokenizerUnsupported(Exception):
    """The native tokenizer would not match transformers' here; the message says why (one log line)."""


def _token_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise NativeTokenizerUnsupported(f"special token {value!r}")


class NativeTokenizer:
    """What the server calls on ``loaded.tokenizer`` (see the module docstring)."""

    native = True
    is_fast = True

    def __init__(self, backend: Tokenizer, config: dict[str, Any], template: str | None, name_or_path: str) -> None:
        self._tokenizer = backend
        backend.no_truncation()             # transformers' call turns both off when none is asked for
        backend.no_padding()
        backend.encode_special_tokens = False
        if backend.post_processor is None:  # transformers installs a no-op template then (ids unchanged)
            from tokenizers import processors

            backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
        self.name_or_path = name_or_path
        self._named = {k: _token_text(config.get(k)) for k in NAMED}
        self.extra_special_tokens = [_token_text(t) for t in (config.get("extra_special_tokens")
                                                              or config.get("additional_special_tokens") or [])]
        ml = config.get("model_max_length", config.get("max_len"))
        self.model_max_length = int(ml) if ml is not None else VERY_LARGE_INTEGER
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._cleanup_bpe = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                                            False))
        self.chat_template = template
        self.padding_side = config.get("padding_side", "right")

    # ------------------------------------------------------------------ special tokens
    def __getattr__(self, name: str) -> Any:
        named = self.__dict__.get("_named", {})
        if name in named:
            return named[name]
        if name.endswith("_token_id") and name[:-3] in named:
            tok = named[name[:-3]]
            return None if tok is None else self._tokenizer.token_to_id(tok)
        raise AttributeError(name)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: v for k, v in self._named.items() if v is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        out: list[str] = []
        for t in [v for v in self._named.values() if v is not None] + self.extra_special_tokens:
            if t not in out:
                out.append(t)
        return out

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    # ------------------------------------------------------------------ vocabulary
    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> Any:
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> Any:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(i) for i in ids if i not in special]

    # ------------------------------------------------------------------ encode / decode
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """``{"input_ids": [...], "attention_mask": [...]}`` of one text (``encode_batch``, as transformers)."""
        if not isinstance(text, str):
            raise ValueError("text input must be of type `str`")
        enc = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        return {"input_ids": list(enc.ids), "attention_mask": list(enc.attention_mask)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, token_ids: int | list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **_: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean and (type(self._tokenizer.model).__name__ != "BPE" or self._cleanup_bpe):
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def batch_decode(self, sequences: list[list[int]], **kwargs: Any) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, conversation: list[dict[str, Any]], tokenize: bool = True,
                            add_generation_prompt: bool = False, return_dict: bool = True, **kwargs: Any) -> Any:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = chat_template.render(self.chat_template, conversation, add_generation_prompt,
                                    self.special_tokens_map, **kwargs)
        if not tokenize:
            return text
        out = self(text, add_special_tokens=False)
        return out if return_dict else out["input_ids"]

    def __repr__(self) -> str:
        return f"NativeTokenizer({self.name_or_path!r}, vocab={len(self)})"


def _added_tokens(backend: Tokenizer) -> dict[int, dict[str, Any]]:
    return {int(i): {k: getattr(t, k) for k in _FLAGS} for i, t in backend.get_added_tokens_decoder().items()}


def from_dir(model_dir: str | Path) -> NativeTokenizer:
    """The native tokenizer of ``model_dir``, or :class:`NativeTokenizerUnsupported` saying why not."""
    d = Path(model_dir)
    if not d.is_dir():
        raise NativeTokenizerUnsupported("not a local model directory")
    if not (d / "tokenizer.json").is_file():
        raise NativeTokenizerUnsupported("no tokenizer.json")
    if not (d / "tokenizer_config.json").is_file():
        raise NativeTokenizerUnsupported("no tokenizer_config.json")
    try:
        tc = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        model_cfg = json.loads((d / "config.json").read_text(encoding="utf-8")) if (d / "config.json").is_file() else {}
    except (OSError, ValueError) as exc:
        raise NativeTokenizerUnsupported(f"unreadable tokenizer config: {exc}") from None
    _check_config(d, tc, model_cfg)
    try:
        backend = Tokenizer.from_file(str(d / "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own Exception type
        raise NativeTokenizerUnsupported(f"unreadable tokenizer.json: {type(exc).__name__}: {exc}") from None
    _check_tokens(d, tc, backend)
    template = None
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    elif tc.get("chat_template") is not None:
        template = tc["chat_template"]
    return NativeTokenizer(backend, tc, template, str(model_dir))


def _no(why: str) -> None:
    raise NativeTokenizerUnsupported(why)


def _check_config(d: Path, tc: dict[str, Any], model_cfg: dict[str, Any]) -> None:
    no = _no
    if tc.get("tokenizer_class") not in CLASSES:
        no(f"tokenizer_class {tc.get('tokenizer_class')!r} (native: {', '.join(CLASSES)})")
    if model_cfg.get("model_type") != "llama":
        no(f"model_type {model_cfg.get('model_type')!r}: transformers picks its own tokenizer class")
    if not chat_template.jinja_ok():
        no("jinja2 older than 3.1.6")
    for key in ("auto_map", "fast_tokenizer_files", "split_special_tokens", "model_specific_special_tokens"):
        if tc.get(key):
            no(f"{key} in tokenizer_config.json")
    extra_named = [k for k, v in tc.items() if k.endswith("_token") and k not in NAMED and isinstance(v, str)]
    if extra_named:
        no(f"model-specific special tokens {extra_named[:3]}")
    extra = tc.get("extra_special_tokens") or tc.get("additional_special_tokens") or []
    if not isinstance(extra, list):
        no("extra_special_tokens is not a list")
    if not isinstance(tc.get("chat_template"), (str, type(None))) or (d / "additional_chat_templates").is_dir():
        no("several chat templates")


def _check_tokens(d: Path, tc: dict[str, Any], backend: Tokenizer) -> None:
    """Every special token must already be an added token, with the flags tokenizer_config.json gives it."""
    no = _no
    extra = tc.get("extra_special_tokens") or tc.get("additional_special_tokens") or []
    added = _added_tokens(backend)
    if "added_tokens_decoder" in tc:
        for idx, tok in (tc["added_tokens_decoder"] or {}).items():
            want = {k: tok.get(k) for k in _FLAGS} if isinstance(tok, dict) else None
            if want is None or added.get(int(idx)) != want:
                no(f"added token {idx} differs from tokenizer.json's")
    elif (d / "special_tokens_map.json").is_file() or (d / "added_tokens.json").is_file():
        no("legacy special_tokens_map.json / added_tokens.json")
    contents = {t["content"] for t in added.values()}
    for value in [tc.get(k) for k in NAMED] + list(extra):
        text = _token_text(value)
        if text is not None and text not in contents:
            no(f"special token {text!r} is not an added token of tokenizer.json")
