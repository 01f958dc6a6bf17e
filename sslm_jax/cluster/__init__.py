"""Running as one of many processes: joining, watching, leaving, and the slices behind them.

join starts `jax.distributed` after a roll call (rendezvous), with the coordination service in
a process of its own (coordinator); lease keeps one run per workdir; preemption stops cleanly on
a signal or a TPU notice; topology names the chips of a Cloud TPU slice for ahead-of-time plans.
Nothing here knows about models or data.
"""
