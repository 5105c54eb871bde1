"""OpenAI's log-probability objects from the runtime's per-token entries (``runtime.sampler.TokenLogprob``).

/v1/completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (``top_logprobs``:
per token a dict of the N most likely tokens' texts, most likely first, plus the chosen token when
it is not among them: OpenAI's "up to logprobs + 1"; tokens whose texts coincide keep the likelier).
/v1/chat/completions: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
"logprob", "bytes"}]}], "refusal": null}`` with exactly N alternatives.

A token's entry goes out with the text it starts in (``RowLogprobs``): a stream sends it in the
chunk whose text reaches it (text held back, a partial character or a possible stop string, holds
its entries back too), and a row ended by a stop string keeps the entries of the tokens that start
before the cut, as its text does (its ``token_ids`` run to the token that completed the stop string).
"""

from __future__ import annotations

import bisect

from ..runtime.sampler import TokenLogprob

LOOKBACK = 6  # tokens decoded before a new one, so that its text is decoded in context (spaces, characters)


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # unprintable bytes take the code points after 255, in order
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenNames:
    """Each token's text (special tokens by name, a byte of a longer character as U+FFFD) and its
    own bytes: for a byte-level BPE the bytes its symbols stand for, so a token holding part of a
    UTF-8 character reports that part; otherwise its text's UTF-8 bytes. Memoised (one per server)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.alphabet = byte_level_alphabet() if type(decoder).__name__ == "ByteLevel" else None
        self.added = set(tokenizer.get_added_vocab().values())
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._texts[token]

    def bytes(self, token: int) -> list[int]:
        if token not in self._bytes:
            symbols = self.tokenizer.convert_ids_to_tokens(token)
            if self.alphabet is not None and token not in self.added and all(c in self.alphabet for c in symbols):
                self._bytes[token] = [self.alphabet[c] for c in symbols]
            else:
                self._bytes[token] = list(self.text(token).encode("utf-8"))
        return self._bytes[token]


class RowLogprobs:
    """One row's tokens, where each one's text starts in the row's text, and which entries are out.

    A token's offset is the length of the text of the tokens before it, decoded as the row's text is
    (special tokens skipped); a token that ends inside a character adds its text with the token that
    completes it, so both start where the character does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.entries: list[TokenLogprob] = []
        self.offsets: list[int] = []
        self.settled = 0  # leading tokens whose text is decoded
        self.length = 0  # characters of that text
        self.sent = 0  # characters of the row's text sent so far
        self.released = 0  # entries sent so far

    def push(self, ids: list[int], entries: list[TokenLogprob], text: str, final: bool,
             stopped: bool) -> list[tuple[int, TokenLogprob, int]]:
        """Add a row's next tokens, their entries and the text sent with them; returns the (token,
        entry, text offset) now due: those of the tokens that start before the text sent so far
        and, at the row's end, the rest (a row cut by a stop string: none past the cut)."""
        for token, entry in zip(ids, entries, strict=True):
            self.offsets.append(self.length)
            self.ids.append(token)
            self.entries.append(entry)
            self._settle()
        self.sent += len(text)
        due = len(self.ids) if final and not stopped else bisect.bisect_left(self.offsets, self.sent)
        items = list(zip(self.ids, self.entries, self.offsets))[self.released: due]
        self.released = max(self.released, due)
        return items

    def _settle(self) -> None:
        lo = max(0, self.settled - LOOKBACK)
        before = self.tokenizer.decode(self.ids[lo: self.settled], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[lo:], skip_special_tokens=True)
        if after.endswith("\ufffd"):  # the last token ends inside a character: it is settled by the next
            return
        self.length += len(after) - len(before)
        self.settled = len(self.ids)


def completion_logprobs(items: list[tuple[int, TokenLogprob, int]], names: TokenNames) -> dict:
    """/v1/completions' ``logprobs`` object for ``RowLogprobs.push``'s items."""
    tops = []
    for token, entry, _ in items:
        top: dict[str, float] = {}
        for alternative, logprob in entry.top:
            top.setdefault(names.text(alternative), logprob)
        top.setdefault(names.text(token), entry.logprob)
        tops.append(top)
    return {"tokens": [names.text(t) for t, _, _ in items], "token_logprobs": [e.logprob for _, e, _ in items],
            "top_logprobs": tops, "text_offset": [offset for _, _, offset in items]}


def chat_logprobs(items: list[tuple[int, TokenLogprob, int]], names: TokenNames) -> dict:
    """/v1/chat/completions' ``logprobs`` object for ``RowLogprobs.push``'s items."""
    def described(token: int, logprob: float) -> dict:
        return {"token": names.text(token), "logprob": logprob, "bytes": names.bytes(token)}

    return {"content": [{**described(token, entry.logprob), "top_logprobs": [described(*a) for a in entry.top]}
                        for token, entry, _ in items], "refusal": None}
