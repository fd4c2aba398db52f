"""What every batch-system plugin shares: logging one line per event, running a hook so that it
never shows a traceback, building the execution-host Job from facts the batch system vouches for,
and installing hook scripts with their interpreter and config path fixed.

Per-system translation lives beside this (``blahvm.batch.lsf``, ``.pbs``, ``.slurm``); the scripts
under ``plugins/`` only call into it.
"""
