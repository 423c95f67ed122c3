#!/usr/bin/env python
"""`python train.py ...`: the same command as the installed `jaxcontrol-train`. The code is
jaxcontrol/commands/train.py; `--help` lists the options."""

from jaxcontrol.commands.train import *  # noqa: F401,F403  (`import train` keeps working)
from jaxcontrol.commands.train import console_main

if __name__ == "__main__":
    console_main()
