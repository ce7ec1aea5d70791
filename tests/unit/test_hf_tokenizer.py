"""The run's tokenizer in a Hugging Face export: AutoTokenizer.from_pretrained on what
tools/checkpoint/hf_tokenizer.py writes gives our tokenizer's ids, BOS included, and decodes back."""

import io
import json
import os

import pytest

from megatron.training.config import TokenizerConfig
from megatron.training.tokenizer import load_tokenizer
from tools.checkpoint.checks import ConversionError
from tools.checkpoint.hf_tokenizer import (ExportedTokenizer, export_tokenizer, read_sentencepiece_model,
                                           without_added_tokens)

transformers = pytest.importorskip("transformers")

TEXTS = ["", " ", "  ", "\n", "a", " leading space", "  two leading spaces", "trailing  \n", "Hello world",
         "line one\nline two\n\n  indented\ttab\t\ttabs\r\nwindows", "digits 0 1 12 123 1234567 3.14159 -42",
         "ünïcödé façade naïve Ærøskøbing", "emoji 😀🎉 \U0001f469\u200d\U0001f467 and CJK 日本語の文章 中文 한국어",
         "rare bytes \x00\x07 \u2047 \ufffd \U0001f9ec", "▁already▁metaspace", "<s>literal</s> <unk> [INST]",
         "<|endoftext|>between documents<|endoftext|>", "x" * 300, "    def f(x):\n        return x ** 2\n"]


def _corpus_texts(assets):
    texts = list(TEXTS)
    for corpus in ("shakespeare.jsonl", "stdlib.jsonl"):
        with open(os.path.join(assets, corpus)) as f:
            texts.append(json.loads(next(f))["text"][:3000])
    return texts


def _args(assets, kind):
    if kind == "GPT2BPETokenizer":
        return {"tokenizer_type": kind, "vocab_file": os.path.join(assets, "gpt2/vocab.json"),
                "merge_file": os.path.join(assets, "gpt2/merges.txt")}
    return {"tokenizer_type": kind, "tokenizer_model": os.path.join(assets, "llama2/tokenizer.model")}


def _ours(args):
    names = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model")
    return load_tokenizer(TokenizerConfig(**{k: args.get(k) for k in names}))


def _export_and_load(args, directory, model_type="llama"):
    """Export next to a config.json of ``model_type`` (AutoTokenizer reads it too), then load."""
    ours = _ours(args)
    os.makedirs(directory, exist_ok=True)
    arch = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[model_type]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"architectures": [arch], "model_type": model_type, "vocab_size": ours.vocab_size}, f)
    exported = export_tokenizer(args, str(directory), vocab_size=ours.vocab_size)
    return ours, exported, transformers.AutoTokenizer.from_pretrained(str(directory))


def _assert_same(ours, hf, texts, *, bos):
    for text in texts:
        ids = ours.tokenize(text)
        assert hf(text)["input_ids"] == ids, text[:60]
        assert hf.encode(text) == ids, text[:60]
        assert hf.encode(text, add_special_tokens=False) == (ids[1:] if bos else ids), text[:60]
        if bos:
            assert ids[0] == hf.bos_token_id
        decoded = hf.decode(ids, skip_special_tokens=bos)  # skip only the BOS the tokenizer added
        assert decoded == ours.detokenize(ids), text[:60]
        if "\u2581" not in text:  # SentencePiece itself decodes its whitespace mark as a space
            assert decoded == text, text[:60]


@pytest.mark.parametrize("kind,model_type", [("GPT2BPETokenizer", "gpt2"), ("GPT2BPETokenizer", "llama"),
                                             ("SentencePieceTokenizer", "llama"), ("GPTSentencePieceTokenizer", "gpt2"),
                                             ("Llama2Tokenizer", "llama"), ("Llama2Tokenizer", "gpt2")])
def test_export_encodes_as_the_run(assets, tmp_path, kind, model_type):
    args = _args(assets, kind)
    ours, exported, hf = _export_and_load(args, tmp_path / "hf", model_type)
    bos = kind == "Llama2Tokenizer"
    _assert_same(ours, hf, _corpus_texts(assets), bos=bos)
    assert hf.eos_token_id == ours.eod == exported.eos_token_id
    assert hf.pad_token is None and exported.pad_token_id is None
    written = sorted(os.path.basename(p) for p in exported.files)
    common = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    if kind == "GPT2BPETokenizer":
        assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<|endoftext|>",) * 3
        assert exported.config_fields() == {"bos_token_id": 50256, "eos_token_id": 50256}
        assert written == sorted(common + ["merges.txt", "vocab.json"])
    else:
        assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<s>", "</s>", "<unk>")
        assert exported.config_fields() == {"bos_token_id": 1, "eos_token_id": 2}
        assert written == sorted(common + ["tokenizer.model"])
        assert hf.encode("<s>") == ours.tokenize("<s>") != ([1, 1] if bos else [1])  # text, as SentencePiece
    assert all(os.path.isfile(p) for p in exported.files)


@pytest.mark.parametrize("added", [True, False], ids=["special-added-token", "no-added-tokens"])
def test_huggingface_folder_without_its_bos_template(assets, tmp_path, added):
    """A saved tokenizer.json that adds BOS and a config naming LlamaTokenizer (which transformers 5 would
    rebuild its own way): the export encodes as the run did, without BOS. Without added tokens the run
    read <|endoftext|> in text as text, and so does the export."""
    from tokenizers import processors

    gpt2 = _ours(_args(assets, "GPT2BPETokenizer"))
    folder = tmp_path / "run_tokenizer"
    folder.mkdir()
    saved = json.loads(gpt2.backend.to_str())
    template = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 50256)])
    saved["post_processor"] = {"type": "Sequence", "processors": [saved["post_processor"],
                                                                   json.loads(template.__getstate__())]}
    if not added:
        saved["added_tokens"] = []
    (folder / "tokenizer.json").write_text(json.dumps(saved))
    config = {"tokenizer_class": "LlamaTokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
              "pad_token": {"content": "<|endoftext|>"}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    args = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(folder)}
    ours, exported, hf = _export_and_load(args, tmp_path / "hf")
    _assert_same(ours, hf, _corpus_texts(assets), bos=False)
    assert (ours.tokenize("a<|endoftext|>") == gpt2.tokenize("a<|endoftext|>")) == added
    assert exported.config_fields() == {"bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256}
    assert hf.eos_token == hf.bos_token == hf.pad_token == "<|endoftext|>"
    assert sorted(os.path.basename(p) for p in exported.files) == [
        "chat_template.jinja", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert hf.chat_template == "{{ messages }}"


def test_post_processors_that_add_tokens_are_dropped():
    byte_level = {"type": "ByteLevel", "trim_offsets": False}
    template = {"type": "TemplateProcessing", "single": []}
    assert without_added_tokens(None) is None
    assert without_added_tokens(template) is None
    assert without_added_tokens(byte_level) == byte_level
    assert without_added_tokens({"type": "Sequence", "processors": [byte_level, template]}) == byte_level
    two = {"type": "Sequence", "processors": [byte_level, {"type": "BertProcessing"}, byte_level]}
    assert without_added_tokens(two) == {"type": "Sequence", "processors": [byte_level, byte_level]}


def _train_sentencepiece(assets, path, vocab_size=400, **options):
    import sentencepiece

    with open(os.path.join(assets, "shakespeare.jsonl")) as f:
        lines = [line for line in json.loads(next(f))["text"].splitlines()[:1500] if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                             minloglevel=2, **options)
    path.write_bytes(model.getvalue())
    return str(path)


def test_sentencepiece_with_nfkc_extra_whitespace_and_user_defined_pieces(assets, tmp_path):
    """SentencePiece's default normalizer (nmt_nfkc, extra spaces removed) and user-defined pieces,
    which it emits whole and never merges across."""
    model = _train_sentencepiece(assets, tmp_path / "bpe.model", model_type="bpe", byte_fallback=True,
                                 user_defined_symbols=["<sep>", "thee"])
    settings = read_sentencepiece_model(open(model, "rb").read())
    assert settings.precompiled_charsmap and settings.remove_extra_whitespaces and settings.add_dummy_prefix
    args = {"tokenizer_type": "Llama2Tokenizer", "tokenizer_model": model}
    ours, _, hf = _export_and_load(args, tmp_path / "hf")
    texts = _corpus_texts(assets) + ["<sep>x", "x<sep>", "a <sep> b  <sep><sep> thee", "fullwidth ＡＢＣ ① ﬁ",
                                     "  spaces   inside  "]
    for text in texts:
        assert hf.encode(text) == ours.tokenize(text), text[:60]
    assert ours.tokenize("x<sep>thee")[-2:] == [hf.convert_tokens_to_ids("<sep>"), hf.convert_tokens_to_ids("thee")]


def test_sentencepiece_unigram_is_refused(assets, tmp_path):
    model = _train_sentencepiece(assets, tmp_path / "unigram.model", model_type="unigram")
    args = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": model}
    with pytest.raises(ConversionError, match="unigram model: the Hugging Face export converts SentencePiece BPE"):
        export_tokenizer(args, str(tmp_path / "hf"), vocab_size=400)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("args", [{}, {"tokenizer_type": None}, {"tokenizer_type": "NullTokenizer", "vocab_size": 512}])
def test_no_tokenizer_writes_nothing(tmp_path, args):
    """NullTokenizer is also what a checkpoint converted from Hugging Face names: no token ids either."""
    exported = export_tokenizer(args, str(tmp_path / "hf"), vocab_size=512)
    assert exported == ExportedTokenizer() and exported.config_fields() == {}
    assert not (tmp_path / "hf").exists()


@pytest.mark.fault
def test_missing_moved_and_unreadable_files_are_refused(assets, tmp_path):
    def refused(args, match, vocab_size=32000):
        with pytest.raises(ConversionError, match=match) as e:
            export_tokenizer(args, str(tmp_path / "hf"), vocab_size=vocab_size)
        assert "\n" not in str(e.value)

    moved = str(tmp_path / "gone/tokenizer.model")
    refused({"tokenizer_type": "Llama2Tokenizer", "tokenizer_model": moved},
            f"tokenizer file {moved} \\(tokenizer_model\\) does not exist here \\(moved since training\\?\\): "
            f"pass --tokenizer-model")
    refused({"tokenizer_type": "Llama2Tokenizer"}, "has no tokenizer_model: pass --tokenizer-model")
    gpt2 = _args(assets, "GPT2BPETokenizer")
    refused({**gpt2, "merge_file": moved}, "pass --merge-file", vocab_size=50257)
    refused({**gpt2, "vocab_file": None}, "has no vocab_file: pass --vocab-file", vocab_size=50257)
    refused({"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(tmp_path)},
            "cannot load the HuggingFaceTokenizer tokenizer", vocab_size=50257)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    refused({"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": str(garbage)},
            "cannot load the SentencePieceTokenizer tokenizer from .*garbage.model")
    refused(_args(assets, "Llama2Tokenizer"), "has 32000 tokens but the model 32008: these are not the run's "
            "tokenizer files; pass the run's with --tokenizer-model", vocab_size=32008)
    refused({"tokenizer_type": "TikTokenizer"}, "tokenizer_type 'TikTokenizer'")
    assert not (tmp_path / "hf").exists()


@pytest.mark.fault
def test_unwritable_save_dir_is_refused(assets, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConversionError, match="cannot be written"):
        export_tokenizer(_args(assets, "Llama2Tokenizer"), str(blocker / "hf"), vocab_size=32000)
