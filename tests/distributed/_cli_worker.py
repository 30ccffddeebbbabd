"""``python -m tests.distributed._cli_worker ARGS...``: ``bevdeploy ARGS...`` with ``bevdet-r50-cbgs`` reduced to the
engine tests' small config (the CLI has no flag for model overrides; full-size models take minutes on a CPU)."""

import functools
import sys

from bevdeploy.models import MODELS
from tests.engine.test_engine_bevdet import SMALL

if __name__ == "__main__":
    MODELS["bevdet-r50-cbgs"] = functools.partial(MODELS["bevdet-r50-cbgs"], **SMALL)
    from bevdeploy.cli import main

    sys.exit(main(sys.argv[1:]))
