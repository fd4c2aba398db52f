# blahvm's OpenPBS hook: queuejob, execjob_begin / execjob_prologue, execjob_launch, execjob_epilogue /
# execjob_end, execjob_postsuspend / execjob_preresume, exechost_periodic. PBS runs it with its own Python, no __file__ and __name__ 'builtins':
# where blahvm lives and which site config to use come from the hook's config file (JSON), imported
# with `qmgr -c "import hook blahvm application/x-config default blahvm_hook.json"`. See docs/pbs.md.
import json
import sys

import pbs

# pbs_server restarts its embedded interpreter whenever the resource definitions change (qmgr create
# resource); a C extension such as PyYAML's _yaml cannot be initialised twice in one process ("metaclass
# conflict" in yaml/cyaml.py), so every later queuejob would fail. Without it PyYAML uses its pure
# Python parser, which survives the restart.
sys.modules.setdefault("yaml._yaml", None)


def _blahvm_main():
    try:
        with open(pbs.hook_config_filename) as stream:
            settings = json.load(stream)
        for path in reversed(settings.get("path", [])):
            if path not in sys.path:
                sys.path.insert(0, path)
        from blahvm.batch.pbs import openpbs_hook
    except Exception as error:  # no traceback for the user: one line, and a requeue where that applies
        event = pbs.event()
        pbs.logmsg(pbs.LOG_ERROR, "blahvm hook: cannot start: %s" % (error,))
        if event.type == pbs.EXECJOB_LAUNCH:  # execjob_begin/prologue requeue on a bare reject (docs/pbs.md)
            event.job.rerun()
        event.reject("blahvm hook: cannot start: %s" % (error,))
        return
    openpbs_hook(pbs, settings)


_blahvm_main()
