"""The training corpus of the shipped demo model: English prose from CPython's standard library.

Documents are the docstrings of the standard library's own modules, classes and functions (read
from the source with ``ast``: nothing is imported) plus the language reference topics of
``pydoc_data``. Licence: the Python Software Foundation License (PSF-2.0), under which the standard
library and its documentation are distributed. The corpus the demo was trained on is shipped
(``corpus.txt.xz`` beside the trained model) so training and the held-out evaluation do not depend
on the interpreter's version; ``build_corpus`` makes it anew from the running interpreter.

Text is byte-level: each UTF-8 byte is one token, mapped through the demo tokenizer's own
vocabulary (its ids are NOT byte + 4: the byte-level alphabet is sorted by its unicode stand-ins).
Documents are joined by the EOS token, so the model learns where a docstring ends.
"""

from __future__ import annotations

import ast
import hashlib
import lzma
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

LICENCE = "PSF-2.0 (Python Software Foundation License Version 2)"
DOC_SEPARATOR = "\x00\n"  # between documents in the stored text; never inside a docstring
# Standard-library directories that hold tests, GUIs, tooling or vendored code rather than the
# library's own documentation.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "tkinter", "ensurepip",
              "venv", "__pycache__", "pydoc_data"}
_MIN_DOC_CHARS = 40  # one-liners like "Return x." teach little


def build_corpus() -> list[str]:
    """Docstrings of the running interpreter's standard library, then the pydoc topics, in a fixed order."""
    import pydoc_data.topics

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not any(part in _SKIP_DIRS or part.startswith("config-") for part in p.relative_to(root).parts))
    docs = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOC_CHARS and DOC_SEPARATOR not in doc:
                    docs.append(doc)
    docs += [pydoc_data.topics.topics[k].strip() for k in sorted(pydoc_data.topics.topics)]
    return docs


def write_corpus(docs: list[str], path: Path) -> None:
    path.write_bytes(lzma.compress(DOC_SEPARATOR.join(docs).encode("utf-8"), preset=9))


def read_corpus(path: Path) -> list[str]:
    return lzma.decompress(Path(path).read_bytes()).decode("utf-8").split(DOC_SEPARATOR)


def is_held_out(doc: str) -> bool:
    """About one document in 20 is held out, chosen by content so the split never depends on order."""
    return hashlib.sha256(doc.encode("utf-8")).digest()[0] % 20 == 0


def byte_to_id_table(tokenizer) -> torch.Tensor:
    """[256] int64: the token id of each byte under a byte-level tokenizer (from its vocabulary)."""
    vocab = tokenizer.get_vocab()
    table = torch.empty(256, dtype=torch.long)
    for byte, char in enumerate(_bytes_to_unicode()):
        if char not in vocab:
            raise ValueError(f"tokenizer: byte {byte} ({char!r}) is not in its vocabulary: not byte-level")
        table[byte] = vocab[char]
    return table


def _bytes_to_unicode() -> list[str]:
    """The byte-level stand-in character of each byte (GPT-2's reversible byte <-> unicode map)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@dataclass(frozen=True)
class TokenStream:
    """The corpus as one stream of token ids, documents separated by EOS; train and held-out apart."""

    train: torch.Tensor  # [n] int64
    held_out: torch.Tensor  # [m] int64
    sha256: str  # of the stored corpus text
    documents: int

    @classmethod
    def from_docs(cls, docs: list[str], tokenizer, eos_id: int) -> "TokenStream":
        table = byte_to_id_table(tokenizer)
        parts = {False: [], True: []}
        for doc in docs:
            ids = table[torch.frombuffer(bytearray(doc.encode("utf-8")), dtype=torch.uint8).long()]
            parts[is_held_out(doc)] += [ids, torch.tensor([eos_id])]
        digest = hashlib.sha256(DOC_SEPARATOR.join(docs).encode("utf-8")).hexdigest()
        joined = {k: torch.cat(v) if v else torch.empty(0, dtype=torch.long) for k, v in parts.items()}
        return cls(joined[False], joined[True], digest, len(docs))

    def batch(self, split: str, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """``batch`` random crops of ``length`` tokens (any offset: blocks need not start at documents)."""
        data = self.train if split == "train" else self.held_out
        starts = torch.randint(0, data.numel() - length, (batch,), generator=gen)
        return torch.stack([data[s : s + length] for s in starts.tolist()])
