"""When and where experiments run: the scheduler (dispatch, slots, look-ahead, retries), the executor
interface it dispatches through (the only door to the container engine) and the local executor,
what one run is (its `RunSpec`, and its `RunResult` judged into an outcome), and run logs."""
