"""A judge behind any OpenAI-compatible chat endpoint (OpenAI, `vllm serve`, ...), with the standard library only.

POST {url}/chat/completions with temperature 0. Requests run in `concurrency` threads; a failed request (no
connection, a timeout, HTTP 429 or 5xx) is retried `retries` times with exponential backoff (backoff, 2 x
backoff, ...); other HTTP errors (401, 404, ...) are not retried. When a request still fails, no new request is
started, the ones in flight finish and are handed back, and the failure is raised as one line: what finished is
kept by the caller's cache, so a rerun resumes. The API key, if any, is read from an environment variable; it
is sent only to the endpoint's origin (a redirect to another origin is not followed) and never printed: every
error line has the key's value and any `Bearer ...` token redacted.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from sera_cli.backends.judges.reply import MalformedReply, reply_json, reply_text
from sera_cli.data.errors import ModelError

_BEARER = re.compile(r"Bearer\s+[^\s\"',;]+", re.IGNORECASE)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the endpoint's origin (scheme, host, port): the request carries the API
    key, which must never reach another server."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        if _origin(target) != _origin(req.full_url):
            scheme, host, port = _origin(target)
            raise JudgeRequestError(f"HTTP {code}: redirected to another origin ({scheme}://{host}:{port}), not "
                                    "followed so that the API key is not sent there; give the final URL as "
                                    "--judge-url if you trust it", 1)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameOriginRedirects)


class JudgeRequestError(Exception):
    """One request's final failure: `reason` is a short phrase, `tries` how many attempts were made."""

    def __init__(self, reason: str, tries: int):
        super().__init__(reason)
        self.reason, self.tries = reason, tries


class HTTPJudge:
    kind = "http"

    def __init__(self, url: str, model: str, *, max_tokens: int, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, retries: int = 4, timeout: float = 120.0, backoff: float = 1.0):
        self.url = url.rstrip("/")
        self.model, self.max_tokens, self.api_key_env = model, max_tokens, api_key_env
        self.concurrency, self.retries, self.timeout, self.backoff = concurrency, retries, timeout, backoff
        self.name = model

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.url, "model": self.model, "max_tokens": self.max_tokens,
                "temperature": 0}

    def _post(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers=headers, method="POST")
        with _OPENER.open(req, timeout=self.timeout) as resp:
            body = resp.read()
        try:
            return reply_text(reply_json(body))
        except MalformedReply as err:  # the endpoint answered, but not with a chat completion: not retried
            raise JudgeRequestError(self.redact(f"{err}: {body[:120].decode(errors='replace')}"), 1) from None

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The judge's reply to one conversation, with retries; JudgeRequestError when it keeps failing."""
        for attempt in range(self.retries + 1):
            try:
                return self._post(messages)
            except urllib.error.HTTPError as err:
                try:
                    detail = self.redact(err.read(4096).decode(errors="replace"))[:200]
                except (OSError, http.client.HTTPException):  # the error body itself broke off
                    detail = ""
                reason = f"HTTP {err.code} {err.reason}" + (f": {detail}" if detail else "")
                if err.code != 429 and err.code < 500:
                    raise JudgeRequestError(self.redact(reason), attempt + 1) from None
            except urllib.error.URLError as err:
                reason = str(err.reason) if not isinstance(err.reason, TimeoutError) else "timed out"
            except TimeoutError:
                reason = f"timed out after {self.timeout:g} s"
            except (ConnectionError, json.JSONDecodeError, http.client.HTTPException) as err:
                reason = f"{type(err).__name__}: {err}"  # HTTPException: a bad status line, a truncated body
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        raise JudgeRequestError(self.redact(reason), self.retries + 1)

    def redact(self, text: str) -> str:
        """`text` (a server's reply, an error) safe to print: the API key's exact value and any `Bearer ...`
        token replaced by '***', on one line of printable characters."""
        if key := os.environ.get(self.api_key_env):
            text = text.replace(key, "***")
        text = _BEARER.sub("Bearer ***", text)
        return " ".join("".join(c if c.isprintable() else " " for c in text).split())

    def run(self, jobs: Sequence[list[dict[str, str]]], on_result: Callable[[int, str], None]) -> None:
        """Judge every job with at most `concurrency` requests in flight; `on_result(i, text)` in this thread."""
        failure: JudgeRequestError | None = None
        done_count = 0
        todo = iter(range(len(jobs)))
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            running = {}
            for i in todo:
                running[pool.submit(self.complete, jobs[i])] = i
                if len(running) >= self.concurrency:
                    break
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = running.pop(fut)
                    try:
                        text = fut.result()
                    except JudgeRequestError as err:
                        failure = failure or err
                        continue
                    on_result(i, text)
                    done_count += 1
                    if failure is None:
                        nxt = next(todo, None)
                        if nxt is not None:
                            running[pool.submit(self.complete, jobs[nxt])] = nxt
        if failure is not None:
            raise ModelError(f"judge endpoint {self.url}: {failure.reason} (after {failure.tries} "
                             f"tr{'y' if failure.tries == 1 else 'ies'}); {done_count} of {len(jobs)} new judgments "
                             "finished and were kept, rerun the same command to resume")
