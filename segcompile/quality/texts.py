"""Long real text that ships on every machine: no downloads.

Two sources, each file one document, each document named so that a result file can say exactly
which texts it measured:

* ``python-stdlib/<module>.py``: the top-level modules of the running Python's standard library
  (``sysconfig.get_paths()["stdlib"]``), in sorted order. Which modules exist and what they hold
  depend on the Python version, so a result also records each document's SHA-256;
* ``common-licenses/<name>``: the licence texts Debian and its derivatives install in
  ``/usr/share/common-licenses`` (symbolic links to another text there are skipped), where present.

Each document belongs to one split, decided by a stable hash of its name (the SHA-256, not
Python's salted ``hash``): about a quarter is ``heldout`` (what quality is measured on) and the
rest ``calibration`` (what head selection may look at), so the two never share a text. Documents
are drawn from the two sources in turn (code, prose, code, ...; one source alone once the other
runs out), each in the order of that hash, a fixed shuffle.
"""

from __future__ import annotations

import hashlib
import itertools
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .scoring import EvalError

STDLIB = "python-stdlib"
LICENSES = "common-licenses"
SOURCES = (STDLIB, LICENSES)
LICENSES_DIR = Path("/usr/share/common-licenses")
SPLITS = ("heldout", "calibration")
HELDOUT_ONE_IN = 4  # a document is held out when its name's hash is divisible by this


@dataclass(frozen=True)
class Document:
    """One text file, named ``<source>/<file name>``."""

    name: str
    path: Path

    @property
    def split(self) -> str:
        return split_of(self.name)

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace")

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class TextSequence:
    """``length`` tokens from the start of one document."""

    document: Document
    ids: torch.Tensor  # [length] int64
    document_tokens: int  # tokens in the whole document

    def describe(self) -> dict:
        """What a result file records about the text: enough to find and check it again."""
        return {
            "name": self.document.name,
            "split": self.document.split,
            "sha256": self.document.sha256(),
            "tokens_used": int(self.ids.numel()),
            "document_tokens": self.document_tokens,
        }


class ByteTokenizer:
    """The UTF-8 bytes of a text as its token ids (vocabulary 256): the tokenizer of models that
    come without one, such as the built-in tiny Llama. Called like a transformers tokenizer."""

    vocab_size = 256
    eos_token_id = None
    name_or_path = "utf-8 bytes"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def encode(tokenizer, text: str) -> list[int]:
    """``text``'s token ids, without the special tokens a tokenizer may add (BOS)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_of(name: str) -> str:
    """``heldout`` or ``calibration``: the same for a name on every machine and Python version."""
    return "heldout" if _name_hash(name) % HELDOUT_ONE_IN == 0 else "calibration"


def documents(split: str | None = "heldout", sources: Sequence[str] = SOURCES) -> list[Document]:
    """The documents of ``split`` (``None``: both) from ``sources``: one of each source in turn,
    each source in the order of its names' hash."""
    if split is not None and split not in SPLITS:
        raise EvalError(f"unknown text split {split!r}; use one of {', '.join(SPLITS)}")
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise EvalError(f"unknown text source {unknown[0]!r}; use {' and/or '.join(SOURCES)}")
    listed = {STDLIB: stdlib_documents, LICENSES: license_documents}
    queues = [sorted((d for d in listed[source]() if split is None or d.split == split),
                     key=lambda d: _name_hash(d.name)) for source in SOURCES if source in sources]
    return [d for turn in itertools.zip_longest(*queues) for d in turn if d is not None]


def stdlib_documents() -> list[Document]:
    """Every top-level ``.py`` module of this Python's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [Document(f"{STDLIB}/{p.name}", p) for p in sorted(root.glob("*.py")) if p.is_file() and not p.is_symlink()]


def license_documents(folder: Path = LICENSES_DIR) -> list[Document]:
    """The licence texts in ``folder`` (none where it does not exist), links to another text skipped."""
    if not folder.is_dir():
        return []
    return [Document(f"{LICENSES}/{p.name}", p) for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()]


def token_sequences(tokenizer, length: int, count: int, split: str = "heldout",
                    sources: Sequence[str] = SOURCES) -> list[TextSequence]:
    """Up to ``count`` sequences of exactly ``length`` tokens: **one document per sequence**, its
    first ``length`` tokens, never several documents joined (a token's long-range context is
    then its own document's). Documents with fewer tokens are skipped; fewer than ``count``
    sequences come back when too few documents are that long. Tokenized without special tokens."""
    if length < 2:
        raise EvalError(f"a perplexity sequence needs at least 2 tokens, got length {length}")
    chosen = []
    for document in documents(split, sources):
        if len(chosen) == count:
            break
        if document.path.stat().st_size < length:  # a token covers at least one byte: cannot be long enough
            continue
        ids = encode(tokenizer, document.text())
        if len(ids) >= length:
            chosen.append(TextSequence(document, torch.tensor(ids[:length], dtype=torch.long), len(ids)))
    return chosen


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
