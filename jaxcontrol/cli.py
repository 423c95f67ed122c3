"""What the three command-line tools share: exit codes and one-line error reporting.

Exit codes (the same in `infer.py`, `train.py` and `convert_weights.py`):

| code | meaning |
| --- | --- |
| 0 | success (also `--help`) |
| 1 | runtime error: a bad file, a config that cannot run, non-finite values, an I/O failure |
| 2 | usage error: a flag is missing, malformed or out of range (the message names it) |
| 130 | interrupted (Ctrl-C); nothing half-written is left at the output path |
| 143 | terminated by SIGTERM (`train.py`: after saving a checkpoint at the step boundary; rerun to resume) |

User errors print one line, `PROG: error: MESSAGE`, on stderr, never a traceback. Anything
else is a bug and keeps its traceback.

Every tool runs with JAX's persistent compilation cache on (`jaxcontrol.compile_cache`: the
directory is `$JAXCONTROL_COMPILE_CACHE`, default `~/.cache/jaxcontrol/xla`; "off" disables it).
"""

from __future__ import annotations

import sys
from typing import Callable

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended


def error(prog: str, message: str, code: int = EXIT_RUNTIME) -> int:
    """Print `prog: error: message` on stderr and return `code`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def run_main(prog: str, main: Callable[[], int]) -> int:
    """Turn on the compilation cache, call `main()` and turn the errors a user can cause into one
    line and an exit code."""
    from .compile_cache import enable
    from .errors import JaxControlError, UsageError

    enable()

    try:
        return main()
    except UsageError as e:
        return error(prog, str(e), EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-written was left at the output path", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (JaxControlError, FloatingPointError, OSError, MemoryError) as e:
        return error(prog, _describe(e), EXIT_RUNTIME)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        reason = e.strerror or str(e)
        return f"{e.filename}: {reason}"
    return str(e) or type(e).__name__
