import os

# A simulated 8-device host, so that mesh/sharding code runs for real on the CPU.
# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLIs run in subprocesses share one compilation cache for the session (jaxcontrol.compile_cache),
# never the user's own; removed at exit.
if "JAXCONTROL_COMPILE_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="jaxcontrol-test-xla-")
    os.environ["JAXCONTROL_COMPILE_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
