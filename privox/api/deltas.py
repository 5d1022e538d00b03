"""
A live transcript as append-only text, for the protocols that cannot take
a word back (Wyoming's C{transcript-chunk}, OpenAI's C{delta}s).

A non-final piece is a hypothesis a later one may change, most likely at
its end: the words it agrees on with what was already said, but its last,
are said now; a final piece says the rest of its utterance. Where a new
hypothesis no longer starts with what was said, nothing more is said until
the utterance's final piece, and that only if it does (the final
transcript, which these protocols also send, has the true text).
"""

from __future__ import annotations

from privox.api.exchange import Heard


class AppendOnly:
    def __init__(self) -> None:
        #: The current utterance's words said so far, and whether anything
        #: at all was (the next text then starts with a space).
        self._said: list[str] = []
        self._any = False

    def heard(self, piece: Heard) -> str:
        """
        The text to append for C{piece}, or C{""}.
        """
        words = piece.text.split()
        stable = words if piece.final else words[:-1]
        said, fresh = self._said, []
        if stable[: len(said)] == said:
            fresh = stable[len(said) :]
            self._said = said + fresh
        if piece.final:
            self._said = []
        if not fresh:
            return ""
        text = " ".join(fresh)
        if self._any:
            text = " " + text
        self._any = True
        return text
