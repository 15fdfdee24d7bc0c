"""`python -m phlora ARGS`: the same as `phlora ARGS`."""

import os
import subprocess
import sys

from phlora import find_phlora_bin


def main() -> int:
    binary = find_phlora_bin()
    args = [binary, *sys.argv[1:]]
    if os.name == "posix":
        # The process becomes phlora: signals (Ctrl-C, SIGTERM from a scheduler) and the exit
        # code reach it and come back unchanged.
        os.execv(binary, args)
    return subprocess.call(args)


if __name__ == "__main__":
    sys.exit(main())
