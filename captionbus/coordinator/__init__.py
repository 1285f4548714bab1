"""The coordinator: owns job state, turns events into stage requests.

`graph` loads workflows from config/workflows, `decide` is the pure decision function,
`service` is the thin NATS adapter (`Coordinator`, `run_coordinator`).
"""
from captionbus.coordinator.decide import (
    Action,
    Decision,
    Policy,
    PublishEvent,
    PublishRequest,
    Tick,
    decide,
)
from captionbus.coordinator.graph import Workflow, WorkflowError, load_workflow, load_workflows

__all__ = [
    "Action",
    "Decision",
    "Policy",
    "PublishEvent",
    "PublishRequest",
    "Tick",
    "decide",
    "Workflow",
    "WorkflowError",
    "load_workflow",
    "load_workflows",
]
