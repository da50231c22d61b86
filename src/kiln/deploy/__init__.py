"""kiln.deploy: the state store and the pure decisions (plan, rollout, reconcile, health).

Only :mod:`kiln.deploy.state` keeps state (SQLite) and the probes in
:mod:`kiln.deploy.health` open sockets; everything else reads immutable views
and returns decisions that the agent carries out.
"""

from kiln.deploy.health import HealthState, HealthTracker, ProbeResult, probe
from kiln.deploy.plan import Action, DesiredService, Plan, desired_from_spec, make_plan
from kiln.deploy.reconcile import ReconcileDecision, ReconcileView, reconcile
from kiln.deploy.rollout import STRATEGIES, Rolling, RolloutStep, RolloutView
from kiln.deploy.state import (
    Event,
    InstanceRecord,
    Revision,
    StateSnapshot,
    StateStore,
)

__all__ = [
    "STRATEGIES",
    "Action",
    "DesiredService",
    "Event",
    "HealthState",
    "HealthTracker",
    "InstanceRecord",
    "Plan",
    "ProbeResult",
    "ReconcileDecision",
    "ReconcileView",
    "Revision",
    "Rolling",
    "RolloutStep",
    "RolloutView",
    "StateSnapshot",
    "StateStore",
    "desired_from_spec",
    "make_plan",
    "probe",
    "reconcile",
]
