"""The step-based engine that every path runs: scheduler, sampler, model runner and the loop around them.

`Engine` (engine.py) is one attention replica's loop: each `step()` the `Scheduler` picks which requests
run (new prompts in chunks under a token budget beside the running decodes), the `ModelRunner` executes
that step through the program (experts in process for a colocated program, or behind the M2N exchange
for a disaggregated attention role), and the sampler picks every request's next token on the device.
"""
