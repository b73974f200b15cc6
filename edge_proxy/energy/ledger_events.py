"""Request events of the ledger core, applied in order from the ledger's queue (sampler thread,
under the ledger's lock): open a request, its tokens, prompt count, model, end, release.

Split from :mod:`edge_proxy.energy.ledger_core` (which owns ticks, splitting and finality); the
attributes declared here are the core's.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Callable

from edge_proxy.energy.apportion import TIME_WEIGHTED, TOKEN_WEIGHTED, ReqView
from edge_proxy.energy.ledger_types import PendingTick, Req


class CoreEvents:
    method: str
    prefill_weight: float
    active: dict[str, Req]
    done: OrderedDict[str, Req]
    pending: list[PendingTick]
    check: dict[str, Req]
    n_unended: int
    newest_t1: int | None
    dirty: list[Req]
    dropped: list[str]

    # -- request events (applied in order, from the ledger's queue) --------------------------
    def start(self, rid: str, t_ns: int, model: str, stream: bool,
              forwarded: Callable[[], int | None] | None, prompt_tokens: int | None,
              token_times: list[int] | None = None) -> None:
        token_known = stream and self.method == TOKEN_WEIGHTED
        attribution = TOKEN_WEIGHTED if token_known else TIME_WEIGHTED
        old = self.active.get(rid)
        if old is not None and old.view.end_ns is None:
            self.n_unended -= 1
        # (positional: rid, start, end, token times known, first token, ev_t, ev_n, tokens seen, prompt)
        if token_times is not None:       # the proxy's own list of token times (one per token): read, not copied
            view = ReqView(rid, t_ns, None, stream, None, token_times, None, 0, prompt_tokens)
        else:
            view = ReqView(rid, t_ns, None, stream, None, [], [], 0, prompt_tokens)
        self.active[rid] = Req(view, model, attribution, forwarded, prefill_weight=self.prefill_weight)
        self.n_unended += 1

    def tokens(self, rid: str, n: int, t_ns: int, prompt_tokens: int | None) -> None:
        r = self.active.get(rid)
        if r is None or n <= 0:
            return
        v = r.view
        changed = v.first_token_ns is None
        if changed:
            v.first_token_ns = t_ns
        et = v.ev_t
        if v.ev_n is None:                # token times are the proxy's list: nothing to record
            pass
        elif et and t_ns < et[-1]:         # keep time order (binary searches rely on it)
            i = bisect.bisect_right(et, t_ns)
            et.insert(i, t_ns)
            v.ev_n.insert(i, int(n))
        else:
            et.append(t_ns)
            v.ev_n.append(int(n))
        if v.ev_n is not None:
            v.tokens_seen += n
            if len(et) > 64 and (len(et) & 63) == 0:
                self._trim(v)
        if prompt_tokens is not None and v.prompt_tokens != prompt_tokens:
            v.prompt_tokens = int(prompt_tokens)
            changed = True
        if changed:
            self._changed(r)

    def _changed(self, r: Req) -> None:
        """A request's weight may have become known: re-check the ticks it blocks (next pass)."""
        if r.blocking and not r.dirty:
            r.dirty = True
            self.dirty.append(r)

    def _trim(self, v: ReqView) -> None:
        """Drop token events older than every pending tick (nobody can need them): amortized O(1)."""
        horizon = self.pending[0].tick.t0_ns if self.pending else self.newest_t1
        et = v.ev_t
        if horizon is None or not et:
            return
        i = bisect.bisect_left(et, horizon)
        if i * 2 >= len(et):
            del et[:i]
            del v.ev_n[:i]

    def set_prompt_tokens(self, rid: str, n: int) -> None:
        r = self.active.get(rid)
        if r is not None and r.view.prompt_tokens != n:
            r.view.prompt_tokens = int(n)
            self._changed(r)

    def set_model(self, rid: str, model: str) -> None:
        r = self.active.get(rid)
        if r is not None:
            r.model = model
            r.key = (model, r.attribution)

    def end(self, rid: str, t_ns: int, prompt_tokens: int | None, output_tokens: int | None,
            model: str | None = None) -> None:
        r = self.active.get(rid)
        if r is None:
            return
        if model is not None:            # set_model, then the end
            r.model = model
            r.key = (model, r.attribution)
        v = r.view
        if v.end_ns is None:
            self.n_unended -= 1
        v.end_ns = max(t_ns, v.start_ns)
        if prompt_tokens is not None:
            v.prompt_tokens = int(prompt_tokens)
        if output_tokens is not None:
            v.output_tokens = int(output_tokens)
        self.check[rid] = r
        self._changed(r)

    def release(self, rid: str) -> None:
        if self.done.pop(rid, None) is None:
            r = self.active.get(rid)
            if r is None:
                return
            r.released = True
            if self.newest_t1 is None:    # no tick ever (a source without a GPU): it will never turn final
                del self.active[rid]
                self.check.pop(rid, None)
                if r.view.end_ns is None:
                    self.n_unended -= 1
                self.dropped.append(rid)
