"""The agent on one node of a Ray cluster: a Ray actor, pinned to its node, that owns the node's
container engine and runs `sandbox` there for the service's Ray executor. Like `sandbox`, it knows
nothing about loops; `service` never runs here (only `service.runs.ray` talks to it, in
`protocol`'s messages).

    agent.py      the actor (`NodeAgent`): prepare, execute (streamed), cancel, release, sweep, report
    protocol.py   what the agent and the executor say to each other

Importing this package does not import Ray; `agent` does.
"""
