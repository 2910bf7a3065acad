"""The pipeline tests' RL reward: ``low_ids`` of tests/rl_reward.py, except that once the path named
by $PREFTUNE_TEST_KILL_WHEN exists (a checkpoint of the run to interrupt), it SIGKILLs its own process:
a crash in the middle of training at a known step."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rl_reward import low_ids  # noqa: E402


def low_ids_or_die(prompts, completions):
    when = os.environ.get("PREFTUNE_TEST_KILL_WHEN")
    if when and Path(when).exists():
        os.kill(os.getpid(), signal.SIGKILL)
    return low_ids(prompts, completions)
