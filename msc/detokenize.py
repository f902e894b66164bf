"""Token ids to text as they stream in, with stop strings.

`TextStream` turns each step's new tokens into the new text they add. A token that ends inside a
multi-byte character, or a word piece whose spacing depends on what follows, is held back until the text
settles (the new tokens are decoded after the previous piece, so spacing comes out as in decoding the
whole output).
With stop strings, text that could be the start of one is held back too; once one appears the text ends
just before it and the stream reports that it stopped.
"""
from __future__ import annotations

class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # all the settled text so far (cut at a stop string once one is seen)
        self.sent = 0  # characters of text already handed out
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] are the context of the next decode
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, ids: list[int]) -> str:
        """Take new tokens; the text to hand out now (may be empty)."""
        if self.stopped:
            return ""
        self.ids += ids
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        # NOTE: "\ufffd" at the end means the last token stops inside a UTF-8 character: wait for the rest
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: whatever text is still held back."""
        if not self.stopped and self._read < len(self.ids):
            rest = self._decode(self.ids[self._prefix:])
            before = self._decode(self.ids[self._prefix:self._read])
            self.text += rest[len(before):]
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.sent - longest)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        end = len(self.text)
        if self.stop and not self.stopped and not final:
            end -= _held_back(self.text, self.stop)
        end = max(end, self.sent)
        out = self.text[self.sent:end]
        self.sent = end
        return out


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that is the beginning of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
