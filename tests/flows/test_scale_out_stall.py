"""A child run whose worker died stays RUNNING: the parent notices when nothing commits for `stuck_s`, at the first
look after it (it took twice `stuck_s`: the first look only recorded a count, from -1)."""

import pytest

from vision_bridge.flows.scale_out import StallWatch


def test_a_lost_child_is_noticed_at_the_first_look_after_stuck_s():
    watch, looks = StallWatch(stuck_s=900), []

    def count(value):
        def read():
            looks.append(value)
            return value
        return read

    watch.start(0, count=4, now=0.0)  # 4 (stage, shard) pairs were committed when the batch was submitted
    assert not watch.stalled(0, 899.0, count(4)) and looks == []  # storage is not read before stuck_s
    assert watch.stalled(0, 901.0, count(4))  # nothing committed since: lost at the first look, not at 1,800 s


def test_a_child_queued_for_a_slot_starts_its_clock_when_it_runs():
    """A child that waited 20 minutes for a free GPU slot is not stalled the moment it starts (its clock starts at
    the first look at it RUNNING); a resubmitted batch starts a new clock."""
    watch = StallWatch(stuck_s=900)
    assert not watch.running(0, 1200.0, lambda: 0)  # first seen RUNNING at 1,200 s (submitted at 0): clock starts
    assert not watch.running(0, 2000.0, lambda: 0)
    assert watch.running(0, 2101.0, lambda: 0)
    watch.forget(0)
    assert not watch.running(0, 2200.0, lambda: 0)


def test_progress_restarts_the_clock_and_a_later_silence_is_noticed():
    watch = StallWatch(stuck_s=900)
    watch.start(0, count=0, now=0.0)
    assert not watch.stalled(0, 950.0, lambda: 2)  # it committed: alive, the clock restarts at 950
    assert watch.stalled_since(0) == 950.0
    assert not watch.stalled(0, 1800.0, lambda: 2)  # 850 s of silence: not yet
    assert watch.stalled(0, 1851.0, lambda: 2)


@pytest.mark.slow  # processes (a Prefect server / spawned workers): not the in-process tier
def test_the_zombie_automation_is_created_once_and_updated_in_place(shared_prefect):
    """The deploy step's automation on a real Prefect server: created, then unchanged on a second deploy, updated
    (not duplicated) when its time limit changes, with the trigger and action of Prefect's zombie-flow recipe.
    (That a lost run is then marked Crashed is Prefect's own mechanism; no test here kills a machine for it.)"""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    from vision_bridge.flows.zombie_runs import AUTOMATION_NAME, ensure_zombie_automation

    with temporary_settings({PREFECT_API_URL: shared_prefect, PREFECT_SERVER_EPHEMERAL_ENABLED: False}):
        _create_update_and_read(Automation, get_client, StateType, AUTOMATION_NAME, ensure_zombie_automation)


def _create_update_and_read(Automation, get_client, StateType, AUTOMATION_NAME, ensure_zombie_automation):
    assert ensure_zombie_automation(240) in ("created", "updated", "unchanged")
    assert ensure_zombie_automation(240) == "unchanged"
    assert ensure_zombie_automation(300) == "updated"
    with get_client(sync_client=True) as client:
        named = [a for a in client.read_automations() if a.name == AUTOMATION_NAME]
    assert len(named) == 1
    automation = Automation.read(name=AUTOMATION_NAME)
    assert automation.trigger.within.total_seconds() == 300 and automation.trigger.after == {"prefect.flow-run.heartbeat"}
    assert automation.actions[0].state == StateType.CRASHED and automation.enabled
    related = automation.trigger.match_related  # only this project's flows, not every run on the server
    related = related[0] if isinstance(related, list) else related
    assert set(related.root["prefect.resource.name"]) == {"bulk-edit", "build-caches", "train-bridge", "process-shards"}
