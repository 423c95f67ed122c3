#!/usr/bin/env python
"""`python infer.py ...`: the same command as the installed `jaxcontrol-infer`. The code is
jaxcontrol/commands/infer.py; `--help` lists the options."""

from jaxcontrol.commands.infer import *  # noqa: F401,F403  (`import infer` keeps working)
from jaxcontrol.commands.infer import console_main

if __name__ == "__main__":
    console_main()
