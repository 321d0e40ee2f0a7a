"""HTTP to the aggregator, with the original retry rule kept as data.

A pull or push makes at most `RetryPolicy.attempts` tries (MAX_RETRY) and waits a
random 0..`max_wait` seconds (MAX_WAIT) between them, or the seconds of the
answer's `Retry-After` (429 from the aggregator's quota, 503 while it cannot
write to disk, 502/504 from its proxy), at most RETRY_AFTER_CAP. Only failures
that another try can cure are retried: no connection, a timeout, 5xx, 429. A
POST is safe to retry because its `update_id` makes the aggregator count it
once. 409 is an answer, not a failure (stale base or finished run); any other
4xx is a bug on this side and raises `ProtocolError` at once.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
import requests

from fedsim import protocol, weights
from fedsim.client.answers import Looked, Offer, Pulled, Pushed
from fedsim.protocol import Ask, Dropout, Evaluation, UpdateMeta

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_CAP = 300.0  # the longest Retry-After waited for (the quota's runs to an hour)
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # far above the cnn's 6.7 MB: a bound, not a limit in use


class ProtocolError(RuntimeError):
    """The aggregator refused a request as malformed: retrying cannot help."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int  # MAX_RETRY: tries in all, not retries after the first
    max_wait: float  # MAX_WAIT: upper bound of the random wait between tries
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    uniform: Callable[[float, float], float] = field(default=random.uniform, repr=False)

    def wait(self, retry_after: str | None) -> tuple[float, str]:
        """The seconds to wait before the next try, and why: the `Retry-After` header's
        whole seconds (at most RETRY_AFTER_CAP), else the random wait."""
        raw = (retry_after or "").strip()
        if re.fullmatch(r"[0-9]{1,12}", raw):
            asked = int(raw)
            if asked <= RETRY_AFTER_CAP:
                return float(asked), f"Retry-After: {asked}"
            return RETRY_AFTER_CAP, f"Retry-After: {asked}, capped at {RETRY_AFTER_CAP:g}s"
        why = f"random, MAX_WAIT={self.max_wait:g}"
        if raw:  # an HTTP date (the aggregator sends seconds) or garbage
            why += f"; Retry-After {raw[:40]!r} is not whole seconds"
        return self.uniform(0.0, self.max_wait), why


@dataclass(frozen=True)
class _Outcome:
    response: requests.Response | None
    retries: int
    error: str = ""


class Transport:
    """The aggregator's API as calls; one `requests.Session` keeps connections alive."""

    def __init__(
        self,
        base_url: str,
        *,
        policy: RetryPolicy,
        timeout: float,
        session: requests.Session | None = None,
        token: str = "",
        verify: str | bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.policy = policy
        self.timeout = timeout
        self.session = session or requests.Session()
        if token:  # every request carries it; the aggregator checks it on those that change state
            self.session.headers["Authorization"] = f"Bearer {token}"
        # A CA file (TLS_CA) or True (the system's CAs), passed with each request: a
        # Session's own `verify` loses to REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE (psf/requests#3829).
        self.verify = verify

    def _call(
        self, method: str, path: str, *, attempts: int | None = None, **kwargs: Any
    ) -> _Outcome:
        """Up to `attempts` tries; a retryable failure waits and tries again."""
        attempts = attempts or self.policy.attempts
        error = ""
        for attempt in range(attempts):
            retry_after = None
            try:
                response = self.session.request(
                    method,
                    self.base_url + path,
                    timeout=self.timeout,
                    stream=True,
                    verify=self.verify,
                    **kwargs,
                )
                _read_capped(response, MAX_RESPONSE_BYTES)
            except requests.RequestException as exc:
                error = describe(exc)
            else:
                if response.status_code not in RETRYABLE_STATUS:
                    return _Outcome(response, attempt)
                error = f"HTTP {response.status_code}"
                retry_after = response.headers.get("Retry-After")
            if attempt + 1 == attempts:
                log.debug("%s %s try %d/%d failed: %s", method, path, attempts, attempts, error)
                break
            wait, why = self.policy.wait(retry_after)
            # A wait the aggregator asked for may be minutes: said, not to look hung.
            level = logging.INFO if why.startswith("Retry-After:") else logging.DEBUG
            log.log(level, "%s %s try %d/%d failed: %s; next try in %.1fs (%s)",
                    method, path, attempt + 1, attempts, error, wait, why)  # fmt: skip
            self.policy.sleep(wait)
        return _Outcome(None, attempts - 1, error)

    @staticmethod
    def _refuse(method: str, path: str, response: requests.Response) -> ProtocolError:
        return ProtocolError(
            f"{method} {path} refused with HTTP {response.status_code}: {response.text[:300]}"
        )

    @staticmethod
    def _answer(method: str, path: str, response: requests.Response) -> dict[str, Any]:
        """The JSON object of a 200 answer; anything else means AGGREGATOR_URL is wrong."""
        answer = _json_object(response)
        if answer is None:
            raise ProtocolError(
                f"{method} {path} answered HTTP 200 without a JSON object "
                f"({response.text[:100]!r}): is AGGREGATOR_URL the aggregator?"
            )
        return answer

    def health(self) -> dict[str, Any] | None:
        """One try at /healthz: its JSON when the aggregator is up, else None."""
        outcome = self._call("GET", "/healthz", attempts=1)
        if outcome.response is None or outcome.response.status_code != 200:
            return None
        return self._answer("GET", "/healthz", outcome.response)

    def status(self, *, attempts: int | None = None) -> dict[str, Any] | None:
        """/v1/status as JSON, or None when it could not be had."""
        outcome = self._call("GET", "/v1/status", attempts=attempts)
        if outcome.response is None:
            return None
        if outcome.response.status_code != 200:
            raise self._refuse("GET", "/v1/status", outcome.response)
        return self._answer("GET", "/v1/status", outcome.response)

    def pull(self, *, etag: str = "", version: int | None = None, fp16: bool = False) -> Pulled:
        """The global model with its metadata (version, samples, model), as float32.

        With `etag` (of the copy held) a 304 answers that it is still current;
        with `version` a past version kept for its evaluation (404 when it is not);
        with `fp16` in half precision (COMPRESSION_DOWN=fp16), widened here.
        """
        headers = {"If-None-Match": f'"{etag}"'} if etag else {}
        params: dict[str, Any] = {"version": version} if version is not None else {}
        if fp16:
            params["encoding"] = "fp16"
        outcome = self._call("GET", "/v1/model", headers=headers, params=params)
        response = outcome.response
        if response is None:
            return Pulled(outcome.retries, error=outcome.error)
        served = (response.headers.get("ETag") or "").strip('"')
        if response.status_code == 304:
            return Pulled(outcome.retries, etag=served, not_modified=True)
        if response.status_code == 404 and version is not None:
            return Pulled(outcome.retries, error=f"version {version} is no longer served")
        if response.status_code != 200:
            raise self._refuse("GET", "/v1/model", response)
        tensors, metadata = weights.decode(response.content, dtypes=("F16",) if fp16 else ("F32",))
        tensors = {name: t.astype(np.float32, copy=False) for name, t in tensors.items()}
        return Pulled(outcome.retries, tensors, metadata, etag=served, bytes=len(response.content))

    def hello(self, worker: str) -> dict[str, Any] | None:
        """Introduce this worker: its short name and how many workers are live, or None."""
        outcome = self._call("POST", "/v1/workers", json={"worker": worker})
        if outcome.response is None:
            return None
        if outcome.response.status_code != 200:
            raise self._refuse("POST", "/v1/workers", outcome.response)
        return self._answer("POST", "/v1/workers", outcome.response)

    def ask(self, worker: str, retries: int = 0) -> Offer:
        """Ask for a task (MAX_RETRY tries)."""
        outcome = self._call("POST", "/v1/tasks", json=Ask(worker, retries).to_json())
        if outcome.response is None:
            return Offer(False, retries=outcome.retries, error=outcome.error)
        if outcome.response.status_code != 200:
            raise self._refuse("POST", "/v1/tasks", outcome.response)
        answer = self._answer("POST", "/v1/tasks", outcome.response)
        try:
            offered = protocol.Offer.from_json(answer)
        except protocol.Invalid as exc:
            raise ProtocolError(
                f"the aggregator sent a task this worker cannot do: {exc}"
            ) from None
        return Offer(
            True,
            task=offered.task,
            worker=offered.worker,
            finished=offered.finished,
            surplus=offered.surplus,
            reason=offered.reason,
            retry_after=offered.retry_after,
            retries=outcome.retries,
        )

    def report(self, evaluation: Evaluation) -> tuple[int | None, dict[str, Any], int]:
        """POST an evaluation: (status or None when unreachable, answer, retries)."""
        return self._post_json("/v1/evaluations", evaluation.to_json())

    def give_back(self, dropped: Dropout) -> tuple[int | None, dict[str, Any], int]:
        """POST a task its client dropped: (status or None when unreachable, answer, retries)."""
        return self._post_json("/v1/dropouts", dropped.to_json())

    def _post_json(self, path: str, body: dict[str, Any]) -> tuple[int | None, dict[str, Any], int]:
        """A small JSON report; 200 and 409 (not wanted any more) are answers, others refusals."""
        outcome = self._call("POST", path, json=body)
        if outcome.response is None:
            return None, {"detail": outcome.error}, outcome.retries
        status = outcome.response.status_code
        if status not in (200, 409):
            raise self._refuse("POST", path, outcome.response)
        return status, _json_or_empty(outcome.response), outcome.retries

    def send(self, path: str, **kwargs: Any) -> tuple[int | None, dict[str, Any], int]:
        """POST to `path` (MAX_RETRY tries): (status, or None unreachable; answer; retries)."""
        outcome = self._call("POST", path, **kwargs)
        if outcome.response is None:
            return None, {"detail": outcome.error}, outcome.retries
        return outcome.response.status_code, _json_or_empty(outcome.response), outcome.retries

    def push(self, tensors: Tensors, meta: UpdateMeta) -> Pushed:
        """Upload an update. The body, and so its update_id, is the same on every try."""
        body = weights.encode(tensors, meta.to_json(), wire=True)  # a codec's dtypes kept
        outcome = self._call(
            "POST",
            "/v1/updates",
            data=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        response = outcome.response
        if response is None:
            return Pushed(False, outcome.retries, detail=outcome.error)
        if response.status_code == 200:
            answer = self._answer("POST", "/v1/updates", response)
            return Pushed(
                bool(answer.get("accepted", True)),
                outcome.retries,
                version=answer.get("version"),
                duplicate=bool(answer.get("duplicate", False)),
                status=200,
                seq=answer.get("seq"),
                bytes=len(body),
            )
        if response.status_code == 409:
            answer = _json_or_empty(response)
            return Pushed(
                False,
                outcome.retries,
                version=answer.get("version"),
                status=409,
                finished=bool(answer.get("finished", False)),
                detail=str(answer.get("detail") or answer.get("error") or ""),
                bytes=len(body),
            )
        raise self._refuse("POST", "/v1/updates", response)

    def lookup(
        self, update_id: str, seq: int | None = None, *, attempts: int | None = None
    ) -> Looked:
        """What became of an accepted update; `seq` lets the aggregator tell forgotten from lost."""
        path = "/v1/updates/" + quote(update_id, safe="")
        params = {"seq": seq} if seq is not None else None
        outcome = self._call("GET", path, attempts=attempts, params=params)
        response = outcome.response
        if response is None:
            return Looked("", outcome.retries, error=outcome.error)
        answer = _json_or_empty(response)
        if response.status_code == 200 and answer.get("state"):
            return Looked(
                str(answer["state"]),
                outcome.retries,
                version=answer.get("version"),
                seq=answer.get("seq"),
            )
        if response.status_code == 404 and answer.get("error") == "unknown_update":
            return Looked("unknown", outcome.retries, forgotten=bool(answer.get("forgotten")))
        raise self._refuse("GET", "/v1/updates/<id>", response)

    def close(self) -> None:
        self.session.close()


def describe(exc: requests.RequestException) -> str:
    """A short reason for a log line; requests' own messages run to several hundred characters."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    if errno:
        return errno.group(1).strip().lower()
    return f"{type(exc).__name__}: {exc}"[:160]


def _read_capped(response: requests.Response, cap: int) -> None:
    """Read the body, refusing one over `cap` bytes before it fills the memory.

    The body is read here once (the request was streamed) and kept where
    `response.content` finds it, so the callers read it as usual.
    """
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > cap:
        response.close()
        raise ProtocolError(f"the aggregator answered {declared} bytes, over {cap}: refused")
    body = bytearray()
    for chunk in response.iter_content(1 << 16):
        body += chunk
        if len(body) > cap:
            response.close()
            raise ProtocolError(f"the aggregator's answer is over {cap} bytes: refused")
    response._content = bytes(body)  # what `content`, `text` and `json()` read


def _json_object(response: requests.Response) -> dict[str, Any] | None:
    try:
        answer = response.json()
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _json_or_empty(response: requests.Response) -> dict[str, Any]:
    return _json_object(response) or {}
