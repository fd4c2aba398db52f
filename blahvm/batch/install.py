"""Write hook scripts whose interpreter, import path and config are fixed at install time.

A hook runs in an environment the user shaped (``bsub`` and ``qsub -V`` pass it on), so it must not
find its config through ``$BLAHVM_CONFIG`` nor its code through ``$PYTHONPATH``: the script runs
``python -IS`` (isolated, no site: also a few milliseconds less on every submission) with the
directories blahvm and its dependencies live in written into it.
"""

from __future__ import annotations

import os
import site
import sys
import tempfile
from typing import List, Optional

from blahvm._version import __version__

TEMPLATE = '''#!{python} -IS
# Installed by `blahvm install {system}` (blahvm {version}). Its config is fixed here and never taken
# from the environment the hook was started with. Re-run the installer after upgrading blahvm.
import sys
sys.path[:0] = {paths!r}
from {module} import {function}
sys.exit({function}(config={config!r}{extra}))
'''


def import_paths() -> List[str]:
    """Where blahvm itself and its dependencies are imported from, for a hook started without site."""
    import blahvm

    here = os.path.dirname(os.path.dirname(os.path.abspath(blahvm.__file__)))
    paths = [here] + [p for p in site.getsitepackages() if os.path.isdir(p)]
    return list(dict.fromkeys(paths))


def hook_script(system: str, module: str, function: str, config: str, extra: Optional[dict] = None,
                python: Optional[str] = None) -> str:
    """The hook's text; ``python`` defaults to this interpreter (a hook run as the job's user needs
    one that user can reach)."""
    arguments = "".join(f", {key}={value!r}" for key, value in (extra or {}).items())
    return TEMPLATE.format(python=python or sys.executable, system=system, version=__version__, paths=import_paths(),
                           module=module, function=function, config=os.path.abspath(config), extra=arguments)


def install_file(path: str, text: "str | bytes", mode: int) -> None:
    """Write ``text`` to ``path`` atomically with ``mode`` (a half-written hook or plugin is never run)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".blahvm-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(text.encode() if isinstance(text, str) else text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
