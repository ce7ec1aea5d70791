"""A run's tokenizer as Hugging Face files, next to an exported model.

:func:`export_tokenizer` writes what ``transformers.AutoTokenizer.from_pretrained(save_dir)``
needs to encode every text to exactly the ids our tokenizer gives
(:func:`megatron.training.tokenizer.load_tokenizer`), with the same BOS behaviour:

    GPT2BPETokenizer             tokenizer.json (our byte-level BPE as is), vocab.json, merges.txt
    SentencePieceTokenizer       tokenizer.json converted from the SentencePiece BPE model, no BOS;
    GPTSentencePieceTokenizer    tokenizer.model (copied, for tools that read it)
    Llama2Tokenizer              the same, BOS first
    HuggingFaceTokenizer         tokenizer.json as the run loaded it, less post-processing that adds
                                 tokens (the run added none); chat_template.jinja when there is one
    NullTokenizer, none          nothing

each with tokenizer_config.json and special_tokens_map.json. The config names the class
``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5): it loads tokenizer.json as
written, where a model class (LlamaTokenizer, GPT2Tokenizer) would rebuild the pipeline its own
way. It sets ``split_special_tokens`` where the run encoded special tokens' text as text
(SentencePiece). Only ``tokenizers`` and ``sentencepiece`` are used: no transformers, and the
SentencePiece model is read without protobuf (:func:`read_sentencepiece_model`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
from typing import Dict, Iterator, List, Optional, Tuple

from tools.checkpoint.checks import ConversionError

_SENTENCEPIECE = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")

# The flags naming each tokenizer's files (model_args keys), as convert.py's overrides spell them.
_FILE_FLAGS = {"GPT2BPETokenizer": ("vocab_file", "merge_file"), "HuggingFaceTokenizer": ("tokenizer_model",),
               **{kind: ("tokenizer_model",) for kind in _SENTENCEPIECE}}


@dataclasses.dataclass(frozen=True)
class ExportedTokenizer:
    """What :func:`export_tokenizer` wrote (paths) and the token ids config.json should carry."""

    files: Tuple[str, ...] = ()
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    def config_fields(self) -> dict:
        """``{bos,eos,pad}_token_id`` for config.json, those the tokenizer has."""
        ids = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
               "pad_token_id": self.pad_token_id}
        return {k: v for k, v in ids.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One tokenizer ready to write: its tokenizers.Tokenizer, special tokens and files to copy."""

    backend: object  # tokenizers.Tokenizer
    specials: Dict[str, str]  # bos_token/eos_token/unk_token/pad_token: token text
    split_special_tokens: bool  # special tokens in text are plain text, as in SentencePiece
    copies: Dict[str, str]  # file name in save_dir: source path


def export_tokenizer(model_args: dict, save_dir: str, *, vocab_size: int) -> ExportedTokenizer:
    """Write the tokenizer a checkpoint's ``model_args`` name into ``save_dir`` for Hugging Face.

    ``vocab_size`` is the model's vocabulary (config.json's ``vocab_size``): the tokenizer must
    have exactly as many tokens. Nothing is written, and no token id returned, for NullTokenizer
    (also what a checkpoint converted from Hugging Face names) or no tokenizer.
    Raises :class:`ConversionError` (one line) for missing, unreadable or mismatched files, and for
    a tokenizer that cannot be carried over exactly."""
    kind = model_args.get("tokenizer_type")
    if kind in (None, "NullTokenizer"):
        return ExportedTokenizer()
    if kind not in _FILE_FLAGS:
        raise ConversionError(f"tokenizer_type {kind!r} of the checkpoint is not one the export knows "
                              f"({', '.join(_FILE_FLAGS)}, NullTokenizer)")
    ours = _load_ours(kind, model_args)
    if ours.vocab_size != vocab_size:
        flags = " and ".join("--" + name.replace("_", "-") for name in _FILE_FLAGS[kind])
        raise ConversionError(f"the {kind} tokenizer from {_files_said(kind, model_args)} has {ours.vocab_size} "
                              f"tokens but the model {vocab_size}: these are not the run's tokenizer files; pass "
                              f"the run's with {flags}")
    if kind == "GPT2BPETokenizer":
        plan = _gpt2_plan(ours, model_args)
    elif kind == "HuggingFaceTokenizer":
        plan = _huggingface_plan(ours, model_args["tokenizer_model"])
    else:
        plan = _sentencepiece_plan(model_args["tokenizer_model"], bos=kind == "Llama2Tokenizer")
    files = _write(plan, save_dir)
    ids = {name: plan.backend.token_to_id(token) for name, token in plan.specials.items()}
    return ExportedTokenizer(files=tuple(files), bos_token_id=ids.get("bos_token"), eos_token_id=ours.eod,
                             pad_token_id=ids.get("pad_token"))


def _files_said(kind: str, model_args: dict) -> str:
    return " and ".join(f"{model_args.get(name)}" for name in _FILE_FLAGS[kind])


def _load_ours(kind: str, model_args: dict):
    """Our tokenizer from the checkpoint's file arguments; ConversionError naming the flag to pass."""
    from megatron.training.config import TokenizerConfig
    from megatron.training.tokenizer import load_tokenizer

    for name in _FILE_FLAGS[kind]:
        flag = "--" + name.replace("_", "-")
        path = model_args.get(name)
        if not path:
            raise ConversionError(f"the checkpoint's {kind} tokenizer has no {name}: pass {flag}")
        exists = os.path.isdir(path) if kind == "HuggingFaceTokenizer" else os.path.isfile(path)
        if not exists:
            raise ConversionError(f"the run's tokenizer {'folder' if kind == 'HuggingFaceTokenizer' else 'file'} "
                                  f"{path} ({name}) does not exist here (moved since training?): pass {flag} "
                                  f"with where it is now")
    config = TokenizerConfig(tokenizer_type=kind, vocab_file=model_args.get("vocab_file"),
                             merge_file=model_args.get("merge_file"), tokenizer_model=model_args.get("tokenizer_model"))
    try:
        return load_tokenizer(config)
    except (ValueError, OSError) as e:
        raise ConversionError(str(e).splitlines()[0]) from None


# -- one plan per tokenizer type ---------------------------------------------------------


def _gpt2_plan(ours, model_args: dict) -> _Plan:
    eod = ours.backend.id_to_token(ours.eod)
    # Hugging Face's GPT-2 convention: <|endoftext|> begins, ends and stands for the unknown
    return _Plan(backend=ours.backend, specials={"bos_token": eod, "eos_token": eod, "unk_token": eod},
                 split_special_tokens=False,
                 copies={"vocab.json": model_args["vocab_file"], "merges.txt": model_args["merge_file"]})


def _huggingface_plan(ours, folder: str) -> _Plan:
    from tokenizers import Tokenizer

    state = json.loads(ours.backend.to_str())
    state["post_processor"] = without_added_tokens(state.get("post_processor"))
    backend = Tokenizer.from_str(json.dumps(state))
    configured = _read_json(os.path.join(folder, "tokenizer_config.json"))
    specials = {"eos_token": backend.id_to_token(ours.eod)}
    for name in ("bos_token", "unk_token", "pad_token"):
        token = configured.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and backend.token_to_id(token) is not None:
            specials[name] = token
    # transformers matches in text the special tokens it is told of; the run matched only the
    # tokenizer's special added tokens, and none at all when it has none
    added_special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    split = not added_special
    if not split:
        specials = {name: token for name, token in specials.items() if token in added_special}
    template = os.path.join(folder, "chat_template.jinja")
    copies = {"chat_template.jinja": template} if os.path.isfile(template) else {}
    return _Plan(backend=backend, specials=specials, split_special_tokens=split, copies=copies)


_ADDS_TOKENS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def without_added_tokens(post_processor: Optional[dict]) -> Optional[dict]:
    """A tokenizer.json ``post_processor`` less the parts that add tokens (templates, BERT/RoBERTa),
    which the run never applied (it encodes with add_special_tokens=False); None if none is left."""
    if post_processor is None:
        return None
    parts = post_processor["processors"] if post_processor.get("type") == "Sequence" else [post_processor]
    kept = [p for p in parts if p.get("type") not in _ADDS_TOKENS]
    if len(kept) <= 1:
        return kept[0] if kept else None
    return {**post_processor, "processors": kept}


def _sentencepiece_plan(model_file: str, *, bos: bool) -> _Plan:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        model = read_sentencepiece_model(sp.serialized_model_proto())
    except (OSError, RuntimeError, ValueError, IndexError, struct.error) as e:
        raise ConversionError(f"{model_file} cannot be read as a SentencePiece model ({e})") from None
    backend = sentencepiece_to_tokenizers(model, where=model_file)
    specials = {name: sp.id_to_piece(i) for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                                                        ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id()))
                if i >= 0}
    if bos:
        from tokenizers import processors

        if "bos_token" not in specials:
            raise ConversionError(f"{model_file} has no BOS piece, which Llama2Tokenizer puts first")
        b = specials["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1", special_tokens=[(b, sp.bos_id())])
    return _Plan(backend=backend, specials=specials, split_special_tokens=True,
                 copies={"tokenizer.model": model_file})


# -- SentencePiece BPE as a tokenizers.Tokenizer -----------------------------------------

# SentencePiece's piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2  # TrainerSpec.ModelType


@dataclasses.dataclass(frozen=True)
class SentencePieceModel:
    """The parts of a SentencePiece ModelProto that decide how it encodes."""

    pieces: Tuple[Tuple[str, float, int], ...]  # (piece, score, type) by id
    model_type: int  # 1 unigram, 2 BPE, 3 word, 4 char
    byte_fallback: bool
    treat_whitespace_as_suffix: bool
    precompiled_charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool


def _varint(buf: bytes, i: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def proto_fields(buf: bytes) -> Iterator[Tuple[int, object]]:
    """(field number, value) of a serialized protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}")
        yield number, value


def read_sentencepiece_model(proto: bytes) -> SentencePieceModel:
    """The fields of sentencepiece_model.proto that encoding depends on (proto2 defaults when absent)."""
    pieces, trainer, normalizer = [], {}, {}
    for number, value in proto_fields(proto):
        if number == 1:  # SentencePiece {piece = 1, score = 2, type = 3}
            p = dict(proto_fields(value))
            score = struct.unpack("<f", p[2])[0] if 2 in p else 0.0
            pieces.append((bytes(p.get(1, b"")).decode("utf-8"), score, p.get(3, NORMAL)))
        elif number == 2:
            trainer = dict(proto_fields(value))
        elif number == 3:
            normalizer = dict(proto_fields(value))
    return SentencePieceModel(
        pieces=tuple(pieces), model_type=trainer.get(3, 1), byte_fallback=bool(trainer.get(35, 0)),
        treat_whitespace_as_suffix=bool(trainer.get(24, 0)), precompiled_charsmap=bytes(normalizer.get(2, b"")),
        add_dummy_prefix=bool(normalizer.get(3, 1)), remove_extra_whitespaces=bool(normalizer.get(4, 1)),
        escape_whitespaces=bool(normalizer.get(5, 1)))


def bpe_merges(model: SentencePieceModel) -> List[Tuple[str, str]]:
    """SentencePiece BPE's merge order as ranked merges: every split of a normal piece into two
    normal pieces, by the merged piece's score (highest first), then its id."""
    normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(model.pieces) if kind == NORMAL}
    ranked = [(-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
              for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
    return [(left, right) for _, _, left, right in sorted(ranked)]


def sentencepiece_to_tokenizers(model: SentencePieceModel, where: str = "the SentencePiece model"):
    """A ``tokenizers.Tokenizer`` that encodes as ``SentencePieceProcessor.encode`` and decodes as
    ``decode``; ConversionError for what it cannot do exactly (models other than BPE, whitespace
    as suffix)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    if model.model_type != _BPE:
        name = {1: "unigram", 3: "word", 4: "char"}.get(model.model_type, str(model.model_type))
        raise ConversionError(f"{where} is a SentencePiece {name} model: the Hugging Face export converts "
                              f"SentencePiece BPE models only")
    if model.treat_whitespace_as_suffix:
        raise ConversionError(f"{where} treats whitespace as a suffix, which the Hugging Face export cannot carry")
    unk = [piece for piece, _, kind in model.pieces if kind == UNKNOWN]
    user_defined = [piece for piece, _, kind in model.pieces if kind == USER_DEFINED]
    vocab = {piece: i for i, (piece, _, _) in enumerate(model.pieces)}
    bpe = dict(vocab=vocab, merges=bpe_merges(model), unk_token=unk[0] if unk else None, fuse_unk=True,
               byte_fallback=model.byte_fallback)
    if user_defined:
        _check_pieces_reach_themselves(BPE(**bpe), model, where)
    # SentencePiece merges nothing across a user-defined piece and emits it whole: split the text
    # around them, and take a chunk that is a piece whole (what merging every normal piece reaches)
    backend = Tokenizer(BPE(**bpe, ignore_merges=bool(user_defined)))
    # SentencePiece's normalizer, in its order
    steps = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:  # spaces only: newlines and tabs stay
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))  # always, even before "▁"; not to the empty text
    backend.normalizer = normalizers.Sequence(steps)
    if user_defined:
        pattern = "|".join(re.escape(piece) for piece in sorted(user_defined, key=len, reverse=True))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    # Control and unknown pieces are special tokens; SentencePiece encodes their text as text, which
    # transformers does too with split_special_tokens (raw tokenizers would match them)
    backend.add_special_tokens([AddedToken(piece, normalized=False, special=True)
                                for piece, _, kind in model.pieces if kind in (CONTROL, UNKNOWN)])
    steps = [decoders.Replace("▁", " ")]
    if model.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if model.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _check_pieces_reach_themselves(bpe, model: SentencePieceModel, where: str) -> None:
    """Merging a normal piece's characters must give the piece itself, so that taking a chunk that
    is a piece whole (BPE ignore_merges) is what SentencePiece does too."""
    stuck = [piece for piece, _, kind in model.pieces
             if kind == NORMAL and [t.value for t in bpe.tokenize(piece)] != [piece]]
    if stuck:
        raise ConversionError(f"{where} has user-defined pieces and pieces its merges do not reach ("
                              f"{', '.join(map(repr, stuck[:4]))}): the Hugging Face export cannot carry it exactly")


# -- files ---------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path} cannot be read as JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def _write(plan: _Plan, save_dir: str) -> List[str]:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **plan.specials,
              "split_special_tokens": plan.split_special_tokens, "clean_up_tokenization_spaces": False}
    written = []
    try:
        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, "tokenizer.json")
        plan.backend.save(path)
        written.append(path)
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", plan.specials)):
            path = os.path.join(save_dir, name)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(content, f, indent=1, ensure_ascii=False)
            written.append(path)
        for name, source in plan.copies.items():
            path = os.path.join(save_dir, name)
            shutil.copyfile(source, path)
            written.append(path)
    except OSError as e:
        raise ConversionError(f"--save-dir {save_dir} cannot be written ({e.strerror or e})") from None
    return written
