"""The guard against Ray Train's placement-group cleaner reading a busy state API as a dead
controller (pipeline/ray_patches.py)."""

import subprocess
import sys
import textwrap

import pytest


def run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_cleaner_imported_after_install_uses_the_guard():
    out = run(
        """
        from pipeline import after_import, ray_patches
        ray_patches.install(); ray_patches.install()  # idempotent
        import sys
        assert "torch" not in sys.modules  # the setup hook of every Ray worker stays light
        assert sum(isinstance(f, after_import._Finder) for f in sys.meta_path) == 1
        assert len(after_import._PENDING[ray_patches.CLEANER]) == 1
        from ray.train.v2._internal.execution.controller import placement_group_cleaner as m
        print(m.is_actor_alive is ray_patches.guarded_is_actor_alive)
        """
    )
    assert out == "True"


def test_cleaner_imported_before_install_is_patched_too():
    out = run(
        """
        from ray.train.v2._internal.execution.controller import placement_group_cleaner as m
        from pipeline import ray_patches
        ray_patches.install()
        print(m.is_actor_alive is ray_patches.guarded_is_actor_alive)
        """
    )
    assert out == "True"


@pytest.mark.parametrize(("state", "expect"), [(None, "unknown"), ("ALIVE", True), ("DEAD", False)])
def test_no_answer_is_unknown_and_only_dead_is_dead(monkeypatch, state, expect):
    from types import SimpleNamespace

    from ray.train.v2._internal.state import util
    from ray.util.state.exception import RayStateApiException

    from pipeline import ray_patches

    answer = None if state is None else SimpleNamespace(state=state)
    monkeypatch.setattr(ray_patches, "gcs_actor_state", lambda actor_id: None)  # no GCS answer
    monkeypatch.setattr(util, "get_actor", lambda actor_id, timeout: answer)
    if expect == "unknown":
        with pytest.raises(RayStateApiException, match="treated as unknown"):
            ray_patches.guarded_is_actor_alive("abc", 1)
    else:
        assert ray_patches.guarded_is_actor_alive("abc", 1) is expect


def test_liveness_comes_from_the_gcs_without_a_dashboard(ray_local):
    """The fixture's instance runs no dashboard, so Ray's HTTP state API cannot answer; the
    guard must still tell a live actor from a killed one (and an unknown id is no answer)."""
    import time

    import ray
    from ray.util.state.exception import RayStateApiException

    from pipeline import ray_patches

    @ray.remote(num_cpus=0)
    class Idle:
        def actor_id(self) -> str:
            return ray.get_runtime_context().get_actor_id()

    actor = Idle.remote()
    actor_id = ray.get(actor.actor_id.remote())
    assert ray_patches.gcs_actor_state(actor_id) == "ALIVE"
    assert ray_patches.guarded_is_actor_alive(actor_id, 1) is True
    ray.kill(actor)
    deadline = time.monotonic() + 30
    while ray_patches.gcs_actor_state(actor_id) != "DEAD" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_patches.guarded_is_actor_alive(actor_id, 1) is False
    assert ray_patches.gcs_actor_state("ff" * 16) is None
    assert ray_patches.gcs_actor_state("not-hex") is None
    with pytest.raises(RayStateApiException):  # neither the GCS nor a state API knows it
        ray_patches.guarded_is_actor_alive("ff" * 16, 1)


def test_a_state_api_that_cannot_pick_a_cluster_is_no_answer(monkeypatch) -> None:
    """With several Ray instances on a machine the state API's address lookup raises
    ConnectionError; the guard must read that as "unknown" (keep monitoring), not crash."""
    from ray.train.v2._internal.state import util
    from ray.util.state.exception import RayStateApiException

    from pipeline import ray_patches

    def ambiguous(actor_id: str, timeout: int) -> None:
        raise ConnectionError("Found multiple active Ray instances")

    monkeypatch.setattr(ray_patches, "gcs_actor_state", lambda actor_id: None)
    monkeypatch.setattr(util, "get_actor", ambiguous)
    with pytest.raises(RayStateApiException, match="unknown"):
        ray_patches.guarded_is_actor_alive("ab" * 16, 1)
