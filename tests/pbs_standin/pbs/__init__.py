"""A stand-in for OpenPBS's ``pbs`` hook module: the documented API (pbs_module(7B)) a hook touches,
with values shaped as a real OpenPBS 23.06 gave them (reference/observed-real-batch.md).

The harness loads one event from a JSON file (``_load``) and writes what the hook did (``_dump``):
accepted or rejected with which message, the job's changed attributes, ``rerun()``/``delete()``,
the launch's progname/argv/env, and vnode resources. Nothing more: the hook's logic is blahvm's.
"""

import json

QUEUEJOB, MODIFYJOB, MOVEJOB, RUNJOB = 1, 2, 4, 8
EXECJOB_BEGIN, EXECJOB_PROLOGUE, EXECJOB_EPILOGUE, EXECJOB_END = 64, 128, 256, 512
EXECJOB_PRETERM, EXECJOB_LAUNCH, EXECHOST_PERIODIC, EXECHOST_STARTUP = 1024, 2048, 4096, 8192
EXECJOB_POSTSUSPEND, EXECJOB_PRERESUME = 0x80000, 0x100000
EVENTS = {"queuejob": QUEUEJOB, "modifyjob": MODIFYJOB, "movejob": MOVEJOB, "runjob": RUNJOB,
          "execjob_begin": EXECJOB_BEGIN, "execjob_prologue": EXECJOB_PROLOGUE,
          "execjob_epilogue": EXECJOB_EPILOGUE, "execjob_end": EXECJOB_END, "execjob_preterm": EXECJOB_PRETERM,
          "execjob_launch": EXECJOB_LAUNCH, "exechost_periodic": EXECHOST_PERIODIC,
          "exechost_startup": EXECHOST_STARTUP, "execjob_postsuspend": EXECJOB_POSTSUSPEND,
          "execjob_preresume": EXECJOB_PRERESUME}
LOG_DEBUG, LOG_WARNING, LOG_ERROR = 0x0004, 0x0002, 0x0001
ND_OFFLINE = 1

hook_config_filename = None
_event = None
_server = None
_logs = []
_local = "vm"


class duration(str):
    pass


class size(str):
    pass


class select(str):
    pass


class place(str):
    pass


class pbs_resource(dict):
    """``Resource_List``: indexable (None for what the job does not have), prints as ``name=value,...``
    as PBS does."""

    def __getitem__(self, name):
        return self.get(name)

    def __str__(self):
        return ",".join("%s=%s" % (k, v) for k, v in self.items())


class queue(object):
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name


class job(object):
    def __init__(self, attributes):
        self._rerun = self._delete = False
        for name, value in attributes.items():
            if name in ("Resource_List", "resources_used"):
                value = pbs_resource(value)
            elif name == "queue" and value:
                value = queue(value)
            setattr(self, name, value)

    def rerun(self):
        self._rerun = True

    def delete(self):
        self._delete = True


class vnode(object):
    def __init__(self, name):
        self.name = name
        self.resources_available = pbs_resource()
        self.state = None
        self.comment = None


class _Server(object):
    def __init__(self, default_queue, queues):
        self.default_queue = default_queue
        self._queues = queues

    def queue(self, name):
        if name not in self._queues:
            return None
        return queue(name)


class event(object):
    """``pbs.event()`` returns the one current event."""

    def __new__(cls):
        return _event


class _Event(object):
    def __init__(self, spec):
        self.type = EVENTS[spec["type"]]
        self.hook_name = spec.get("hook_name", "blahvm")
        self.requestor = spec.get("requestor", "")
        self.requestor_host = spec.get("requestor_host", "")
        self.job = job(spec.get("job", {}))
        self.progname = spec.get("progname")
        self.argv = spec.get("argv")
        self.env = spec.get("env")
        self.vnode_list = {_local: vnode(_local)}
        if "job_list" in spec:  # exechost_periodic: the jobs this mom has, by id
            self.job_list = {job_id: job({"id": job_id}) for job_id in spec["job_list"]}
        self._verdict = None
        self._message = ""

    def accept(self, ecode=0):
        self._verdict = "accept"
        raise SystemExit(ecode)

    def reject(self, msg="", ecode=255):
        self._verdict = "reject"
        self._message = msg
        raise SystemExit(ecode)


def server():
    return _server


def get_local_nodename():
    return _local


def logmsg(level, message):
    _logs.append([level, str(message)])


def _load(path):
    global _event, _server, hook_config_filename
    with open(path) as stream:
        spec = json.load(stream)
    hook_config_filename = spec.get("hook_config")
    _server = _Server(spec.get("default_queue", "workq"), spec.get("queues", ["workq"]))
    _event = _Event(spec)


def _unhandled(error):
    """An exception that escaped the hook: PBS rejects the event."""
    _event._verdict = "reject"
    _event._message = "unhandled %s: %s" % (type(error).__name__, error)


def _dump(path):
    j = _event.job
    attributes = {}
    for name, value in vars(j).items():
        if not name.startswith("_"):
            attributes[name] = dict(value) if isinstance(value, dict) else (None if value is None else str(value))
    result = {"verdict": _event._verdict or "accept", "message": _event._message, "job": attributes,
              "rerun": j._rerun, "delete": j._delete, "progname": _event.progname, "argv": _event.argv,
              "env": _event.env, "logs": _logs,
              "vnodes": {n: dict(v.resources_available) for n, v in _event.vnode_list.items()}}
    with open(path, "w") as stream:
        json.dump(result, stream)
