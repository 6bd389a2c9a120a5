"""``haina plan``: per-rank memory and step time of a run before it is launched.

One job per module: :mod:`.gpus` (what a device holds and computes), :mod:`.params` (parameters per rank,
from the components' own TP plans and FSDP2's sharding rule), :mod:`.activations` (what one micro-batch
keeps for backward and works with), :mod:`.memory` (the per-rank terms and the phase that peaks, per
algorithm and backend), :mod:`.throughput` (FLOPs per step and step time at an MFU), :mod:`.search`
(layouts of the same world that fit), :mod:`.report` (table, verdict, JSON) and :mod:`.command` (the CLI).
"""
