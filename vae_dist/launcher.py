"""`accelerate launch` as the launch scripts run it: the same launcher, with its arguments as they
are, but a failed rank ends in one line and the rank's exit code instead of the launcher's
traceback (torch elastic's ChildFailedError report, ~40 lines for 8 ranks). The ranks have
already printed what went wrong (a user error: one `vae-dist: error:` line for the run).

    python -m vae_dist.launcher --num_processes 2 ... -m vae_dist train ...
"""

from __future__ import annotations

import sys


def main() -> int:
    from accelerate.commands.launch import main as accelerate_launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        accelerate_launch()
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
        print(f"vae-dist: launch failed: rank {rank} (pid {failure.pid} on this node) exited with code "
              f"{failure.exitcode} first; its output is above", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
