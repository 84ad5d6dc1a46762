"""Where the files that are not Python live: the jinja2 templates and the keepalived hook.

They stay at the top of the source tree (templates/, hooks/) and pyproject.toml installs them as
data files under the installation prefix, so every way of installing ctbridge has them:

    source tree (make venv, pip install -e)   templates/*.j2              hooks/ctbridge-notify
    pip install (a venv, --user, --prefix)    PREFIX/share/ctbridge/...   PREFIX/lib/ctbridge/...
    the Debian package (prefix /usr)          /usr/share/ctbridge/...     /usr/lib/ctbridge/...

The installed copies are found under the interpreter's prefix, else through the distribution's own
file list (importlib.metadata), which knows the prefix of the other installation schemes; the
source tree wins when ctbridge runs from it.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent.parent
# the paths pyproject.toml's [tool.setuptools.data-files] installs under the prefix
TEMPLATES = "share/ctbridge/templates"
HOOK = "lib/ctbridge/ctbridge-notify"
MARKER = "keepalived.conf.j2"  # one template that every template directory has
# where the Debian package puts them (prefix /usr): the last resort
SYSTEM_PREFIX = Path("/usr")


def _installed(relative: str) -> Path | None:
    """The installed copy of one data file: where the distribution's RECORD says (any pip scheme:
    a venv, --user, --prefix), else under this interpreter's prefix (the Debian package's /usr),
    else None.

    RECORD names data files relative to site-packages (``../../../share/ctbridge/...``). A
    Debian build moves site-packages after RECORD is written, so its paths are checked to exist;
    RECORD comes first so that a pip --user install beside the Debian package uses its own files.
    """
    try:
        dist = importlib.metadata.distribution("ctbridge")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.as_posix().endswith("/" + relative):
                path = Path(str(dist.locate_file(f))).resolve()
                if path.exists():
                    return path
    candidate = Path(sys.prefix) / relative
    return candidate if candidate.exists() else None


def template_dir() -> Path:
    """$CTBRIDGE_TEMPLATES, else the source tree's templates/, else the installed templates."""
    env = os.environ.get("CTBRIDGE_TEMPLATES")
    if env:
        return Path(env)
    source = SOURCE_ROOT / "templates"
    if (source / MARKER).exists():
        return source
    installed = _installed(f"{TEMPLATES}/{MARKER}")
    return installed.parent if installed else SYSTEM_PREFIX / TEMPLATES


def hook_path() -> Path:
    """The keepalived notify hook: the source tree's, else the installed one."""
    source = SOURCE_ROOT / "hooks" / "ctbridge-notify"
    if source.exists():
        return source
    return _installed(HOOK) or SYSTEM_PREFIX / HOOK
