"""phlora: extract LoRA adapters from fully fine-tuned models, with no training data.

The wheel carries the `phlora` command, a Rust binary installed beside Python's own scripts
(no Python ABI coupling). This package only finds it, for `python -m phlora` and for scripts
that want its path.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig

__all__ = ["find_phlora_bin"]


def _candidates():
    exe = "phlora" + (sysconfig.get_config_var("EXE") or "")
    yield os.path.join(sysconfig.get_path("scripts"), exe)
    if sys.version_info >= (3, 10):
        user = sysconfig.get_preferred_scheme("user")
    elif os.name == "nt":
        user = "nt_user"
    else:
        user = "posix_user"
    yield os.path.join(sysconfig.get_path("scripts", scheme=user), exe)
    # `pip install --target DIR` puts the package in DIR and the command in DIR/bin;
    # `--prefix P` puts it in P/lib/pythonX.Y/site-packages and the command in P/bin.
    site = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    yield os.path.join(site, "bin", exe)
    yield os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(site))), "bin", exe)
    found = shutil.which(exe)
    if found:
        yield found


def find_phlora_bin() -> str:
    """The path of the installed `phlora` binary."""
    for path in _candidates():
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "the phlora binary is not installed beside this Python package "
        f"(looked in {sysconfig.get_path('scripts')} and the user scripts folder); "
        "reinstall with `pip install --force-reinstall phlora`"
    )
