"""The command-line tools, installed as `jaxcontrol-infer`, `jaxcontrol-train` and
`jaxcontrol-convert` (and run from a checkout as `python infer.py`, `python train.py`,
`python convert_weights.py`). Each module's `console_main()` is the entry point."""
