"""A guard for a Ray Train 2.60 trap that kills healthy training runs on a loaded machine.

Ray Train v2 starts a `PlacementGroupCleaner` actor that polls the state API once a second and
removes the run's placement group when the controller looks dead. Its liveness test is
`state and state.state != "DEAD"`, and the state API answers `None` (not an error) when a query
under load comes back without the actor, so a busy box reads a live controller as dead: the
placement group is removed, the workers are destroyed ("Destroying worker since its placement
group was removed") and the run falls back to its last checkpoint. Observed on our 2-core box
(load ~15) after ~1,000 "Failed to query Ray Train Controller actor state" warnings.

`install()` is the job's `worker_process_setup_hook` (pipeline.trainer.ensure_ray): it runs in
every Ray worker process, so it must be cheap. It imports nothing from Ray; it registers an import
hook that, when the cleaner module is imported, replaces its liveness test with one that asks the
GCS (the HTTP state API it used needs the dashboard, which a local instance here does not run),
treats "no answer" as "unknown" (the cleaner's existing retry path) and only `DEAD` as dead.
"""

from __future__ import annotations

from types import ModuleType

from pipeline.after_import import after_import

CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def guarded_is_actor_alive(actor_id: str, timeout: int) -> bool:
    """True unless the actor is positively reported DEAD; no answer raises the cleaner's "state
    API unavailable" error so it keeps monitoring instead of cleaning up.

    Asks the GCS first: Ray's HTTP state API lives in the dashboard, which our local instance
    does not start (`include_dashboard=False`), so the cleaner's own query failed every second
    (a "Failed to query Ray Train Controller actor state" warning per second of every job) and
    could never clean up after a crashed controller. The state API stays as the fallback.
    """
    from ray.util.state.exception import RayStateApiException

    state = gcs_actor_state(actor_id)
    if state is None:
        from ray.train.v2._internal.state.util import get_actor

        try:
            answer = get_actor(actor_id, timeout=timeout)
        except ConnectionError:  # e.g. several Ray instances on this machine: no answer either
            answer = None
        state = None if answer is None else answer.state
    if state is None:
        raise RayStateApiException(f"no state for actor {actor_id} (treated as unknown)")
    return state != "DEAD"


def gcs_actor_state(actor_id: str) -> str | None:
    """The actor's state ("ALIVE", "DEAD", ...) straight from the GCS (what `ray list actors`
    shows, no dashboard needed); None without a GCS connection or when the GCS does not know it."""
    try:
        from ray._private import state as gcs

        info = gcs.actors(actor_id=actor_id)
    except Exception:  # not connected, or an id the GCS cannot parse: no answer, not "dead"
        return None
    return info.get("State") if info else None


def patch_module(module: ModuleType) -> None:
    if hasattr(module, "is_actor_alive"):
        module.is_actor_alive = guarded_is_actor_alive


def install() -> None:
    """Patches at once if the cleaner module is already imported, else when it is."""
    after_import(CLEANER, patch_module)
