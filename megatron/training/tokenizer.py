"""Tokenizers behind Megatron-LM's ``--tokenizer-type`` flags.

    GPT2BPETokenizer         --vocab-file vocab.json --merge-file merges.txt   (HF ``tokenizers``)
    SentencePieceTokenizer   --tokenizer-model tokenizer.model                 (``sentencepiece``; no BOS)
    GPTSentencePieceTokenizer  the same
    Llama2Tokenizer          --tokenizer-model tokenizer.model                 (``sentencepiece``; BOS first)
    HuggingFaceTokenizer     --tokenizer-model FOLDER with tokenizer.json     (HF ``tokenizers``, local only)
    NullTokenizer            --vocab-size N; text is space-separated ids

Every tokenizer has ``vocab_size``, ``eod`` (the end-of-document id that
``--append-eod`` and ``--eod-mask-loss`` use), ``tokenize(text) -> list[int]``,
``detokenize(ids) -> str`` and ``unique_identifiers`` (megatron-core's datasets
key their caches on it). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "HuggingFaceTokenizer", "NullTokenizer")


class _Tokenizer:
    def __init__(self, **identity):
        self.unique_identifiers = {"class": type(self).__name__, **identity}

    def __call__(self, text: str) -> List[int]:
        return self.tokenize(text)


class GPT2BPETokenizer(_Tokenizer):
    """OpenAI's GPT-2 byte-level BPE from ``vocab.json`` (encoder.json) and ``merges.txt`` (vocab.bpe)."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import ByteLevelBPETokenizer

        super().__init__(vocab_file=os.path.abspath(vocab_file), merge_file=os.path.abspath(merge_file))
        self._tok = ByteLevelBPETokenizer(vocab_file, merge_file, add_prefix_space=False)
        with open(vocab_file, encoding="utf-8") as f:
            encoder = json.load(f)
        self.vocab_size = len(encoder)
        self.eod = encoder["<|endoftext|>"]
        self._tok.add_special_tokens(["<|endoftext|>"])

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` that encodes and decodes (what a Hugging Face export saves)."""
        return self._tok._tokenizer

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(_Tokenizer):
    """A SentencePiece model; ``bos=True`` (Llama2Tokenizer) puts BOS before every document."""

    def __init__(self, model_file: str, *, bos: bool = False):
        import sentencepiece

        super().__init__(model_file=os.path.abspath(model_file), bos=bos)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.eod = self.eos_id
        self.add_bos = bos

    def tokenize(self, text: str) -> List[int]:
        ids = self._sp.encode(text)
        return [self.bos_id] + ids if self.add_bos else ids

    def detokenize(self, ids) -> str:
        return self._sp.decode(list(ids))


class HuggingFaceTokenizer(_Tokenizer):
    """A local Hugging Face tokenizer folder: ``tokenizer.json`` (+ ``tokenizer_config.json`` for EOS)."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} has no tokenizer.json; HuggingFaceTokenizer reads a local folder "
                                    f"saved with save_pretrained() (nothing is downloaded)")
        super().__init__(folder=os.path.abspath(folder))
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = [_configured_eos(folder), "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"]
        self.eod = next((self._tok.token_to_id(t) for t in candidates
                         if t is not None and self._tok.token_to_id(t) is not None), None)
        if self.eod is None:
            raise ValueError(f"cannot find the end-of-document token of {folder}: set eos_token in "
                             f"tokenizer_config.json")

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` that encodes and decodes (what a Hugging Face export saves)."""
        return self._tok

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _configured_eos(folder: str) -> Optional[str]:
    config = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


class NullTokenizer(_Tokenizer):
    """No vocabulary: text is a space-separated list of ids; EOD is the last id."""

    def __init__(self, vocab_size: int):
        super().__init__(vocab_size=vocab_size)
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1

    def tokenize(self, text: str) -> List[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(i) for i in ids)


def tokenizer_files(args) -> List[str]:
    """The files the configured tokenizer reads (for dry runs and early checks)."""
    kind = args.tokenizer_type
    if kind == "GPT2BPETokenizer":
        return [args.vocab_file, args.merge_file]
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        return [args.tokenizer_model]
    if kind == "HuggingFaceTokenizer":
        return [os.path.join(args.tokenizer_model or "", "tokenizer.json")]
    return []


def build_tokenizer(args):
    kind = args.tokenizer_type
    if kind == "GPT2BPETokenizer":
        return GPT2BPETokenizer(args.vocab_file, args.merge_file)
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        return SentencePieceTokenizer(args.tokenizer_model)
    if kind == "Llama2Tokenizer":
        return SentencePieceTokenizer(args.tokenizer_model, bos=True)
    if kind == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(args.tokenizer_model)
    if kind == "NullTokenizer":
        return NullTokenizer(args.vocab_size)
    raise ValueError(f"unknown --tokenizer-type {kind}; choose one of {', '.join(TOKENIZER_TYPES)}")


def load_tokenizer(args):
    """:func:`build_tokenizer`, with files that cannot be read as this tokenizer (not JSON, not a
    SentencePiece model, another tokenizer's files) reported as ValueError naming them."""
    try:
        return build_tokenizer(args)
    except Exception as e:  # json, sentencepiece and tokenizers each raise their own kinds
        files = ", ".join(tokenizer_files(args)) or "its flags"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load the {args.tokenizer_type} tokenizer from {files} ({detail}); give the files "
                         f"of a {args.tokenizer_type} tokenizer (or the --tokenizer-type they are)") from None


def add_tokenizer_args(parser):
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json (encoder.json)")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt (vocab.bpe)")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model file, or a local Hugging Face tokenizer folder")
    return g


def check_tokenizer_args(args) -> Optional[str]:
    """A message saying what to change, or None when the tokenizer flags are complete and the files exist."""
    kind = args.tokenizer_type
    needs = {"GPT2BPETokenizer": ("vocab_file", "merge_file"), "HuggingFaceTokenizer": ("tokenizer_model",),
             "NullTokenizer": ("vocab_size",)}.get(kind, ("tokenizer_model",))
    for name in needs:
        if getattr(args, name, None) is None:
            return f"--tokenizer-type {kind} needs --{name.replace('_', '-')}"
    if kind == "NullTokenizer" and args.vocab_size < 2:
        return f"--vocab-size {args.vocab_size}: a vocabulary needs at least 2 tokens"
    for path in tokenizer_files(args):
        if not os.path.isfile(path):
            return (f"tokenizer file {path} does not exist (run tools/fetch_assets.py for the project's "
                    f"GPT-2 and Llama-2 tokenizers)")
    return None
