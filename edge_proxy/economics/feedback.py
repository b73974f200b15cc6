"""``POST /edge/feedback``: user-submitted quality scores for recent requests.

Owns the endpoint's authentication (bearer token), body validation, one-feedback-per-request and
the outcome counts. Must not keep scores itself: an accepted score goes to ``record_score``.
"""
from __future__ import annotations

import hmac
import json
from typing import Callable

from aiohttp import web
from prometheus_client import Counter

from edge_proxy.proxy import json_input
from edge_proxy.economics.quality import RecentRequests


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status,
                             headers=headers)


class FeedbackEndpoint:
    """``token()``: ``economics.feedback_token`` now (empty: feedback disabled)."""

    def __init__(self, token: Callable[[], str | None], recent: RecentRequests, outcomes: Counter,
                 record_score: Callable[[str, float, str], None]) -> None:
        self.token = token
        self.recent = recent
        self.outcomes = outcomes
        self.record_score = record_score

    async def handle(self, request: web.Request) -> web.Response:
        token = self.token()
        if not token:
            self.outcomes.labels("disabled").inc()
            return error(404, "feedback is disabled: set economics.feedback_token")
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not hmac.compare_digest(
                auth[7:].strip().encode(), token.encode()):
            self.outcomes.labels("unauthorized").inc()
            return error(401, "missing or wrong bearer token",
                         headers={"WWW-Authenticate": "Bearer"})
        try:
            body = json_input.loads(await request.read())
            rid = body["request_id"]
            score = body["score"]
            if not isinstance(rid, str) or isinstance(score, bool) \
                    or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
                raise ValueError      # (NaN and infinities fail the range check)
            score = float(score)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            self.outcomes.labels("bad_request").inc()
            return error(400, 'body must be {"request_id": str, "score": number in 0..1}')
        seen = self.recent.get(rid)
        if seen is None:
            self.outcomes.labels("unknown_request").inc()
            return error(404, "unknown or expired request_id")
        if not self.recent.claim_feedback(rid):
            self.outcomes.labels("duplicate").inc()
            return error(409, "feedback for this request_id was already accepted")
        self.record_score(seen.model, score, "feedback")
        self.outcomes.labels("accepted").inc()
        return web.json_response({"accepted": True, "model": seen.model})
