"""LSF: the esub (submission host), the elim (capacity), and PRE_EXEC / JOB_STARTER / POST_EXEC
(execution host). ``plugins/lsf/`` and the scripts ``blahvm install lsf`` writes only call into
these modules; the esub's path (``params``, ``resreq``, ``esub``) imports the standard library and
the compiled route table only, so that it starts fast on every ``bsub``.
"""

# PRE_EXEC exit codes (docs/lsf.md): 0 runs the job, any other value re-pends it, 99 ends it
PRE_EXEC_OK, PRE_EXEC_RETRY, PRE_EXEC_FAIL_JOB = 0, 1, 99
# esub: LSB_SUB_ABORT_VALUE when LSF did not give one (openlava uses 97)
DEFAULT_ABORT_VALUE = 97
# elim: ELIM_ABORT_VALUE when LSF did not give one
DEFAULT_ELIM_ABORT_VALUE = 1
# JOB_STARTER: the payload never ran (the same value as blahvm.lifecycle.LAUNCH_FAILED)
STARTER_FAILED = 255
