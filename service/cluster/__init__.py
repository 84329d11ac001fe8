"""Experiments on a Ray cluster: one agent per node runs `sandbox` there; `RayExecutor` is the
executor the scheduler dispatches through. Importing this package does not import Ray."""
