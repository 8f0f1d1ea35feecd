"""Elastic residency over HTTP: each LLM's state in /v1/models, and sleep / wake for operators.

``POST /v1/models/{model}/sleep`` offloads an idle elastic LLM's weights to host memory (its GPU
memory goes to the other LLMs' KV); ``POST /v1/models/{model}/wake`` brings them back before a
request does. Sleep is not a lock: the next request for a sleeping LLM wakes it, as it wakes one
that the idle policy offloaded. Both answer at once when the LLM is already in that state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from muxserve.instance.residency import WakeDeferred
from muxserve.server.prompts import find_model
from muxserve.server.protocol import ApiError

if TYPE_CHECKING:
    from muxserve.instance.instance import Instance
    from muxserve.server.api import ServerState


async def model_states(state: ServerState) -> dict[str, str]:
    """Each LLM's residency now: ``resident``, ``offloaded``, or ``waking`` (offloaded with a request
    waiting: the instance wakes it at its next poll). Empty once the engine has stopped."""
    try:
        load = await state.driver.call(lambda instance: instance.load())
    except RuntimeError:
        return {}
    return {name: "waking" if llm.state == "offloaded" and llm.waiting else llm.state
            for name, llm in load.llms.items()}


async def change_residency(state: ServerState, name: str, sleep: bool) -> dict:
    """Offload (``sleep``) or wake the elastic LLM ``name``; the answer of both routes."""
    state.check_accepting()
    model = find_model(state.models, name)
    if model.residency != "elastic":
        raise ApiError(400, f"`{name}` is pinned to the device (residency: pinned in the model config); "
                            "only elastic LLMs sleep and wake", "model")

    def run(instance: Instance):
        offloaded = instance.load().llms[name].state == "offloaded"
        if offloaded == sleep:
            return None  # already there
        return instance.offload(name) if sleep else instance.wake(name)

    try:
        event = await state.driver.call(run)
    except WakeDeferred as exc:
        raise ApiError(409, f"`{name}` cannot be woken now: the memory it needs is held by requests in "
                            f"flight ({exc}); try again shortly", "model") from None
    except ValueError as exc:  # e.g. sleep while it has requests
        raise ApiError(409, str(exc), "model") from None
    except RuntimeError as exc:  # the engine thread has ended
        raise ApiError(503, str(exc)) from None
    return {"id": name, "object": "model", "state": "offloaded" if sleep else "resident",
            "changed": event is not None, "seconds": event.seconds if event else 0.0,
            "bytes": event.nbytes if event else 0}
