"""The native tokenizer (model_server.native.tokenizer) against transformers' AutoTokenizer, issue 17.

On the tiny preset's tokenizer and variants of it (a Llama-3-style post-processor adding BOS with
``clean_up_tokenization_spaces``; a chat template in tokenizer_config.json using every helper transformers
gives templates; the older ``additional_special_tokens`` key; a word-level model, where the clean-up applies):
identical input_ids with and without special tokens, decode strings (skip_special_tokens both ways), streamed
detokenization, chat-template output, special tokens and ids, the prompt byte bound, on a generated set of texts
(unicode, whitespace, special tokens inline). Then what falls back to transformers, and why."""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from model_server.api_common import prompt_byte_bound  # noqa: E402
from model_server.native import select  # noqa: E402
from model_server.native.tokenizer import NativeTokenizer, NativeTokenizerUnsupported, from_dir  # noqa: E402
from model_server.text import IncrementalDetokenizer  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
FIXED = ["", " ", "  two leading", "trailing  ", "\n\n", "\t tab\t", "Hello, World!", "def f(x):\n    return x * 2\n",
         "héllo wörld", "日本語のテキスト", "emoji 😀👍🏽 family 👨\u200d👩\u200d👧", "combining e\u0301 and \u00e9",
         "zero\u200bwidth", "nul \u0000 byte", "\r\n crlf \r", "<s>inline</s> specials", "<|im_start|>user\nhi<|im_end|>",
         "<pad><pad>", "a<s>b", " <s> ", "</s>", "<s", "RTL עברית and العربية", "nbsp\u00a0here", "don't can't I'm",
         "hello , world . is it ? yes ! they 're here", "x" * 300, "   \n   \n", "tab\tseparated\tvalues"]
TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    "{% if loop.index > 6 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "<|im_start|>{{ m['role'] }}\n{% generation %}{{ m['content'] | trim }}{% endgeneration %}<|im_end|>\n"
    "{% if m['role'] == 'system' %}{{ {'k': m['content'], 'n': [1, 2]} | tojson }}{{ dict(a=1) | tojson(indent=2) }}"
    "{% continue %}{% endif %}\n{% endfor %}"
    "{{ strftime_now('%Y') | length }}{{ ns.n }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief, ça <b>&</b> 😀"}, {"role": "user", "content": "héllo\nwörld <s> 😀"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  b  "}, {"role": "user", "content": "c"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": None}],
    [{"role": "user", "content": str(i)} for i in range(9)],
]


def _texts() -> list[str]:
    rng = random.Random(0)
    alphabet = list("abcXYZ019 ,.!?'\n\t") + ["é", "ß", "語", "😀", "\u0301", "\u00a0", "  ", "<", ">", "|"] + SPECIALS
    return FIXED + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(60)]


def _edit(src: str, dst: Path, tok_config=None, tok_json=None) -> str:
    shutil.copytree(src, dst)
    if tok_config is not None:
        p = dst / "tokenizer_config.json"
        c = json.loads(p.read_text())
        tok_config(c)
        p.write_text(json.dumps(c))
    if tok_json is not None:
        p = dst / "tokenizer.json"
        c = json.loads(p.read_text())
        tok_json(c)
        p.write_text(json.dumps(c))
    return str(dst)


def _word_level(dst: Path, tiny: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    shutil.copytree(tiny, dst)
    words = SPECIALS + ["hello", ",", "world", ".", "is", "it", "?", "yes", "!", "they", "'re", "here", "don", "'", "t",
                        "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(dst / "tokenizer.json"))
    c = json.loads((dst / "tokenizer_config.json").read_text())
    c.update(clean_up_tokenization_spaces=True)
    (dst / "tokenizer_config.json").write_text(json.dumps(c))
    return str(dst)


@pytest.fixture(scope="module")
def tokenizer_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("native_tok")

    def bos_template(j):
        j["post_processor"] = {"type": "TemplateProcessing",
                               "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                          {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                        {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                               "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}

    def llama3_config(c):
        c.update(clean_up_tokenization_spaces=True, model_max_length=512, tokenizer_class="PreTrainedTokenizerFast",
                 add_bos_token=False, unk_token={"__type": "AddedToken", "content": "<pad>", "special": True})

    def template_in_config(c):
        c["chat_template"] = TEMPLATE
        c["additional_special_tokens"] = c.pop("extra_special_tokens")

    d = {"tiny": tiny_model_dir,
         "llama3-style": _edit(tiny_model_dir, root / "l3", llama3_config, bos_template),
         "template": _edit(tiny_model_dir, root / "tpl", template_in_config),
         "word-level": _word_level(root / "wl", tiny_model_dir)}
    (Path(d["template"]) / "chat_template.jinja").unlink()
    return d


@pytest.mark.parametrize("name", ["tiny", "llama3-style", "template", "word-level"])
def test_native_tokenizer_matches_transformers(tokenizer_dirs, name):
    d = tokenizer_dirs[name]
    ref = transformers.AutoTokenizer.from_pretrained(d)
    got = from_dir(d)
    assert isinstance(got, NativeTokenizer)
    for attr in ("all_special_ids", "all_special_tokens", "special_tokens_map", "bos_token", "eos_token",
                 "pad_token", "unk_token", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
                 "model_max_length", "clean_up_tokenization_spaces", "vocab_size", "chat_template"):
        assert getattr(ref, attr) == getattr(got, attr), attr
    assert len(ref) == len(got) and ref.get_vocab() == got.get_vocab()
    assert ref.backend_tokenizer.to_str() == got.backend_tokenizer.to_str()
    assert prompt_byte_bound(ref, 100) == prompt_byte_bound(got, 100)
    if name == "llama3-style":      # the variants exercise what they are for
        assert got("a")["input_ids"][0] == got.bos_token_id and got("a", add_special_tokens=False)["input_ids"][0] != 1
    if name == "word-level":
        assert got.decode(got("hello , world .")["input_ids"]) == "hello, world."
    rng = random.Random(1)
    n = len(ref)
    specials = ref.all_special_ids
    for text in _texts():
        for add in (True, False):
            ids = ref(text, add_special_tokens=add)["input_ids"]
            assert got(text, add_special_tokens=add)["input_ids"] == ids, (text, add)
        seqs = [ids, [rng.randrange(n) for _ in range(rng.randint(1, 12))],
                [rng.choice(specials + [rng.randrange(n)]) for _ in range(6)]]
        for seq in seqs:
            for skip in (True, False):
                assert got.decode(seq, skip_special_tokens=skip) == ref.decode(seq, skip_special_tokens=skip), seq
            a, b = IncrementalDetokenizer(ref), IncrementalDetokenizer(got)
            assert [a.add(t) for t in seq] + [a.flush()] == [b.add(t) for t in seq] + [b.flush()]
    assert got.decode(specials[0]) == ref.decode(specials[0])
    if ref.chat_template:
        for chat in CHATS:
            for gen in (True, False):
                try:
                    want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
                except Exception as exc:  # noqa: BLE001 - the native one must fail the same way
                    with pytest.raises(type(exc)) as e:
                        got.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
                    assert str(e.value) == str(exc)
                    continue
                assert got.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == want
                assert (got.apply_chat_template(chat, add_generation_prompt=gen)["input_ids"]
                        == ref.apply_chat_template(chat, add_generation_prompt=gen)["input_ids"])


def test_chat_template_errors_match(tokenizer_dirs):
    d = tokenizer_dirs["template"]
    ref, got = transformers.AutoTokenizer.from_pretrained(d), from_dir(d)
    chat = [{"role": "tool", "content": "x"}]
    errors = []
    for tok in (ref, got):
        with pytest.raises(Exception) as e:
            tok.apply_chat_template(chat, tokenize=False)
        errors.append((type(e.value).__name__, str(e.value)))
    assert errors[0] == errors[1] == ("TemplateError", "no tools here")
    for tok in (ref, got):      # the sandbox refuses what transformers' refuses
        tok.chat_template = "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ''.__class__ }}"
        with pytest.raises(Exception):
            tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_what_falls_back(tiny_model_dir, tmp_path, monkeypatch, caplog):
    cases = {
        "tokenizer_class 'LlamaTokenizer'": dict(tok_config=lambda c: c.update(tokenizer_class="LlamaTokenizer")),
        "not an added token": dict(tok_config=lambda c: c.update(unk_token="<unk-x>")),
        "split_special_tokens": dict(tok_config=lambda c: c.update(split_special_tokens=True)),
        "several chat templates": dict(tok_config=lambda c: c.update(chat_template=[{"name": "a", "template": "x"}])),
        "added token 1 differs": dict(tok_config=lambda c: c.update(added_tokens_decoder={"1": {
            "content": "<s>", "lstrip": True, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}})),
        "model-specific special tokens": dict(tok_config=lambda c: c.update(image_token="<s>")),
    }
    for i, (why, kw) in enumerate(cases.items()):
        d = _edit(tiny_model_dir, tmp_path / str(i), **kw)
        with pytest.raises(NativeTokenizerUnsupported, match=why):
            from_dir(d)
    legacy = Path(_edit(tiny_model_dir, tmp_path / "legacy"))
    (legacy / "special_tokens_map.json").write_text(json.dumps({"bos_token": "</s>"}))
    with pytest.raises(NativeTokenizerUnsupported, match="legacy"):
        from_dir(str(legacy))
    bare = Path(_edit(tiny_model_dir, tmp_path / "bare"))
    (bare / "tokenizer.json").unlink()
    with pytest.raises(NativeTokenizerUnsupported, match="no tokenizer.json"):
        from_dir(str(bare))
    qwen = Path(_edit(tiny_model_dir, tmp_path / "qwen"))
    cfg = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(NativeTokenizerUnsupported, match="model_type 'qwen2'"):
        from_dir(str(qwen))
    with caplog.at_level(logging.INFO, logger="model_server.loading"):
        assert isinstance(select.load_tokenizer(tiny_model_dir, native=True), NativeTokenizer)
        assert not isinstance(select.load_tokenizer(str(legacy), native=True), NativeTokenizer)
        monkeypatch.setenv("MODEL_SERVER_NO_TRANSFORMERS", "0")
        assert not isinstance(select.load_tokenizer(tiny_model_dir, native=True), NativeTokenizer)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenizer: ")]
    assert lines[0] == "tokenizer: native (tokenizer.json, no transformers)"
    assert lines[1].startswith("tokenizer: transformers (legacy special_tokens_map.json")
    assert lines[2] == "tokenizer: transformers (MODEL_SERVER_NO_TRANSFORMERS=0)"
