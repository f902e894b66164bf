"""Which attention replica a served request goes to: where its prefix was sent before, unless that replica is busy.

Each attention replica keeps its own prefix cache (msc.runtime.prefix_cache), so a request only finds its
system prompt cached on a replica that already computed it. The router remembers, for the name of each
full page of the prompts it placed (the same chained hashes the replicas use), the replica it sent that page
to. A new request goes to the replica holding its longest remembered prefix, as long as that replica has at
most `slack` more unfinished requests than the least loaded one; otherwise, or with nothing remembered, it goes
to the least loaded replica (the lowest index among equals).

NOTE: this is an estimate of the replicas' caches, not a mirror: a replica may have evicted a page the router
still names (the request then computes it again, nothing worse), and the memory is bounded (least recently
used names go first). The balance rule keeps a popular prefix from piling every request onto one replica.
"""
from __future__ import annotations

from collections import OrderedDict

from msc.runtime.prefix_cache import extend_names

MAX_PAGES = 64  # pages of a prompt's start that are remembered (1024 tokens at 16 a page)
MAX_NAMES = 200_000  # names remembered in all


class PrefixRouter:
    def __init__(self, page_size: int, slack: int = 2):
        self.page_size, self.slack = page_size, slack
        self._replica_of: OrderedDict[bytes, int] = OrderedDict()
        self.routed_by_prefix = 0  # requests placed on the replica that had their prefix

    def _names(self, prompt: list[int]) -> list[bytes]:
        pages = min((len(prompt) - 1) // self.page_size, MAX_PAGES)
        return extend_names([], pages, self.page_size, lambda start, n: prompt[start:start + n])

    def place(self, prompt: list[int], loads: list[int]) -> int:
        """The replica for a request with this prompt, given each replica's unfinished requests; remembers it."""
        least = min(range(len(loads)), key=lambda i: (loads[i], i))
        names = self._names(prompt)
        choice = least
        for name in reversed(names):  # the longest remembered prefix first
            r = self._replica_of.get(name)
            if r is not None and r < len(loads):
                if loads[r] <= loads[least] + self.slack:
                    choice = r
                    self.routed_by_prefix += 1
                break
        for name in names:
            self._replica_of[name] = choice
            self._replica_of.move_to_end(name)
        while len(self._replica_of) > MAX_NAMES:
            self._replica_of.popitem(last=False)
        return choice
