"""vLLM's sleep-mode endpoints on one replica (development mode, `--enable-sleep-mode`):
`POST /sleep?level=N`, `POST /wake_up`, `GET /is_sleeping` -> `{"is_sleeping": bool}`.

Each call has its own timeout; a non-2xx answer or no answer raises SleepCallError with the
endpoint and what came back. Which replica and when is decided in tasks/sleep.py.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from hxp.endpoints import base_url
from hxp.errors import SleepCallError
from hxp.io.probes import probe_model_api
from hxp.spec import ModelSpec
from hxp.units import UnitInstance

#: vLLM's /sleep and /wake_up return once the engine has moved (weights copied to or from the
#: host at level 1: seconds for a large model), so they get a longer timeout than a probe.
CALL_TIMEOUT = 120.0


def _base(inst: UnitInstance) -> str:
    return base_url(inst, dict(inst.ports)["http"])


async def _call(method: str, url: str, timeout: float) -> httpx.Response:
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            answer = await client.request(method, url)
    except httpx.HTTPError as exc:
        raise SleepCallError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
    if answer.status_code == 404:
        raise SleepCallError(
            f"{method} {url}: 404: the endpoint is missing (is VLLM_SERVER_DEV_MODE=1 in the "
            "replica's environment? it started before sleep_mode was set: restart it)"
        )
    if not answer.is_success:
        raise SleepCallError(f"{method} {url}: {answer.status_code} {answer.text[:200]}")
    return answer


def is_sleeping(inst: UnitInstance, timeout: float = 10.0) -> bool:
    """GET /is_sleeping."""
    answer = asyncio.run(_call("GET", f"{_base(inst)}/is_sleeping", timeout))
    try:
        value = answer.json()["is_sleeping"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SleepCallError(f"GET /is_sleeping: unexpected answer {answer.text[:200]!r}") from exc
    if not isinstance(value, bool):
        raise SleepCallError(f"GET /is_sleeping: unexpected answer {answer.text[:200]!r}")
    return value


def put_to_sleep(inst: UnitInstance, level: int, timeout: float = CALL_TIMEOUT) -> None:
    """POST /sleep?level=N&mode=wait: the replica was drained first; `wait` (vLLM >= 0.17:
    let what is in flight finish instead of aborting it; older versions ignore it) keeps a
    request that still arrived from being cut."""
    asyncio.run(_call("POST", f"{_base(inst)}/sleep?level={level}&mode=wait", timeout))


def wake_up(inst: UnitInstance, timeout: float = CALL_TIMEOUT) -> None:
    """POST /wake_up (every tag: weights and KV cache)."""
    asyncio.run(_call("POST", f"{_base(inst)}/wake_up", timeout))


def reload_weights(inst: UnitInstance, timeout: float = CALL_TIMEOUT) -> None:
    """After a wake from level 2 (weights discarded): vLLM's sleep-mode recipe,
    `POST /collective_rpc {"method": "reload_weights"}` then `POST /reset_prefix_cache` (both
    development-mode endpoints, vllm/entrypoints/serve/rpc and cache api_router)."""
    base = _base(inst)

    async def both() -> None:
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                for path, body in (
                    ("/collective_rpc", {"method": "reload_weights"}),
                    ("/reset_prefix_cache", None),
                ):
                    answer = await client.post(f"{base}{path}", json=body)
                    if not answer.is_success:
                        raise SleepCallError(
                            f"POST {base}{path}: {answer.status_code} {answer.text[:200]}"
                        )
        except httpx.HTTPError as exc:
            raise SleepCallError(f"reload of the weights: {type(exc).__name__}: {exc}") from exc

    asyncio.run(both())


def serves_completion(inst: UnitInstance, tries: int, pause: float, timeout: float) -> str:
    """One one-token completion must succeed (up to `tries` attempts, `pause` apart); what
    the last attempt said. SleepCallError when none did."""
    assert isinstance(inst.spec, ModelSpec)
    served = inst.spec.served_name or inst.unit
    reason = "no attempt"
    for attempt in range(max(1, tries)):
        result = asyncio.run(probe_model_api(_base(inst), served, timeout))
        if result.ok:
            return result.reason
        reason = f"{result.check}: {result.reason}"
        if attempt + 1 < tries:
            time.sleep(pause)
    raise SleepCallError(f"no completion succeeded after the wake ({tries} tries): {reason}")


__all__ = [
    "CALL_TIMEOUT",
    "is_sleeping",
    "put_to_sleep",
    "reload_weights",
    "serves_completion",
    "wake_up",
]
