"""A lost machine must cost minutes and free its pool slot: Prefect's own flow-run heartbeats and an automation that
marks a run whose heartbeats stopped as Crashed (Prefect's documented "detect zombie flows" recipe).

A worker killed together with its flow-run process (a lost node) leaves the run RUNNING forever, holding one of its
work pool's concurrency slots; `prefect flow-run cancel` leaves it CANCELLING. Every flow run emits a heartbeat event
every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (Prefect >= 3.1.8; set in the pools' job variables in
`prefect.yaml`); when none arrives for `within_s`, the automation sets the run Crashed, which frees the slot, and the
parent (`scale_out.run_on_workers`) resubmits the batch, whose committed shards are reused.

`prefect deploy --all` creates or updates it (a build step in `prefect.yaml`); by hand:

    python -m vision_bridge.flows.zombie_runs [--within 300]
"""

from __future__ import annotations

import argparse
from datetime import timedelta

AUTOMATION_NAME = "vision-bridge: crash flow runs whose heartbeats stopped"
HEARTBEAT_SECONDS = 60  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY in the pools' job variables (Prefect's minimum: 30)
WITHIN_SECONDS = 300  # five missed heartbeats: a long model load or a slow API is not a lost machine
# only this project's flows: another team's runs on the same server keep their own heartbeat settings
OUR_FLOWS = ("bulk-edit", "build-caches", "train-bridge", "process-shards")


def zombie_automation(within_s: float = WITHIN_SECONDS):
    """The automation: after a run's heartbeat, expect another heartbeat or a final state within `within_s`."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=AUTOMATION_NAME,
        description="Marks a flow run Crashed when its heartbeats stop (a lost worker machine), freeing its work "
                    "pool slot so the parent resubmits its shards. Created by vision-bridge's deploy step.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.name": list(OUR_FLOWS)}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=(
            f"no heartbeat for {within_s:g} s: the worker machine is gone; vision-bridge resubmits the shards"))],
    )


def ensure_zombie_automation(within_s: float = WITHIN_SECONDS) -> str:
    """Creates the automation, or updates it to this definition: "created", "updated" or "unchanged" (idempotent:
    one automation of this name whatever the number of deploys)."""
    from prefect.automations import Automation

    wanted = zombie_automation(within_s)
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:  # Prefect: "Automation with name ... not found"
        existing = None
    if existing is None:
        wanted.create()
        return "created"
    fields = ("description", "trigger", "actions", "enabled")
    if all(getattr(existing, f) == getattr(wanted, f) for f in fields):
        return "unchanged"
    for name in fields:
        setattr(existing, name, getattr(wanted, name))
    existing.update()
    return "updated"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--within", type=float, default=WITHIN_SECONDS,
                        help="seconds without a heartbeat before a run is marked Crashed")
    args = parser.parse_args()
    print(f"{AUTOMATION_NAME}: {ensure_zombie_automation(args.within)} (within {args.within:g} s)")


if __name__ == "__main__":
    main()
