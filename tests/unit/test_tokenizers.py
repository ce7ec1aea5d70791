"""Tokenizers against the reference libraries on real text (Shakespeare and Python sources)."""

import json
import os
from types import SimpleNamespace

import pytest

from megatron.training.tokenizer import (GPT2BPETokenizer, HuggingFaceTokenizer, NullTokenizer,
                                         SentencePieceTokenizer, build_tokenizer, check_tokenizer_args)

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _texts(assets, limit=6):
    texts = []
    for corpus in ("shakespeare.jsonl", "stdlib.jsonl"):
        with open(os.path.join(assets, corpus)) as f:
            texts += [json.loads(next(f))["text"][:40000] for _ in range(limit // 2)]
    return texts + ["Hello world<|endoftext|> again  \n\n  spaces\t\ttabs  ünïcödé 😀 1234567"]


@pytest.fixture(scope="module")
def gpt2(assets):
    return GPT2BPETokenizer(os.path.join(assets, "gpt2/vocab.json"), os.path.join(assets, "gpt2/merges.txt"))


def test_gpt2_bpe_matches_tiktoken(assets, gpt2):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(assets, "gpt2/merges.txt"),
                                            os.path.join(assets, "gpt2/vocab.json"))
    reference = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={"<|endoftext|>": 50256})
    assert (gpt2.vocab_size, gpt2.eod) == (50257, 50256)
    for text in _texts(assets):
        ids = gpt2.tokenize(text)
        assert ids == reference.encode(text, allowed_special="all")
        assert gpt2.detokenize(ids) == text


@pytest.mark.parametrize("bos", [False, True], ids=["SentencePieceTokenizer", "Llama2Tokenizer"])
def test_sentencepiece_matches_sentencepiece(assets, bos):
    import sentencepiece

    model = os.path.join(assets, "llama2/tokenizer.model")
    reference = sentencepiece.SentencePieceProcessor(model_file=model)
    tok = SentencePieceTokenizer(model, bos=bos)
    assert (tok.vocab_size, tok.eod) == (32000, 2)
    for text in _texts(assets):
        expected = reference.encode(text)
        assert tok.tokenize(text) == ([1] + expected if bos else expected)


def test_huggingface_tokenizer_from_a_local_folder(assets, gpt2, tmp_path):
    gpt2._tok.save(str(tmp_path / "tokenizer.json"))  # a real tokenizer.json, as save_pretrained writes
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = HuggingFaceTokenizer(str(tmp_path))
    assert tok.eod == 50256
    for text in _texts(assets):
        assert tok.tokenize(text) == gpt2.tokenize(text)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HuggingFaceTokenizer(str(tmp_path / "missing"))


def test_null_tokenizer_and_flag_checks(assets):
    assert NullTokenizer(100).tokenize("1 2 99") == [1, 2, 99]
    args = SimpleNamespace(tokenizer_type="Llama2Tokenizer", tokenizer_model=os.path.join(assets, "nope.model"),
                           vocab_file=None, merge_file=None, vocab_size=None)
    assert "does not exist" in check_tokenizer_args(args)
    args.tokenizer_model = None
    assert "needs --tokenizer-model" in check_tokenizer_args(args)
    args = SimpleNamespace(tokenizer_type="GPT2BPETokenizer", vocab_file=os.path.join(assets, "gpt2/vocab.json"),
                           merge_file=os.path.join(assets, "gpt2/merges.txt"), tokenizer_model=None, vocab_size=None)
    assert check_tokenizer_args(args) is None
    assert build_tokenizer(args).vocab_size == 50257
