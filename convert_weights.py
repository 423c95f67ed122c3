#!/usr/bin/env python
"""`python convert_weights.py ...`: the same command as the installed `jaxcontrol-convert`. The code is
jaxcontrol/commands/convert.py; `--help` lists the options."""

from jaxcontrol.commands.convert import *  # noqa: F401,F403  (`import convert_weights` keeps working)
from jaxcontrol.commands.convert import console_main

if __name__ == "__main__":
    console_main()
