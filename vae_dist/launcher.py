"""`accelerate launch` as the launch scripts run it: the same launcher, with its arguments as they
are, but its ends are one line and an exit code instead of a traceback:
- a failed rank: the rank's exit code, not torch elastic's ChildFailedError report (~40 lines
  for 8 ranks). The ranks have already printed what went wrong (a user error: one
  `vae-dist: error:` line for the run);
- SIGTERM/SIGINT/SIGHUP/SIGQUIT to the launcher: torch elastic passes the signal on to every
  rank, gives them 30 s to stop (a training run checkpoints and exits 143), kills those left,
  and raises SignalException; this exits 128 + the signal's number, as the signal would;
- launch options accelerate refuses (`--multi_gpu` with one process, ...): its ValueError's
  message, exit code 2.

    python -m vae_dist.launcher --num_processes 2 ... -m vae_dist train ...
"""

from __future__ import annotations

import sys

from vae_dist.errors import first_line


def main() -> int:
    from accelerate.commands.launch import main as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        accelerate_launch()
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
        print(f"vae-dist: launch failed: rank {rank} (pid {failure.pid} on this node) exited with code "
              f"{failure.exitcode} first; its output is above", file=sys.stderr)
        return code
    except SignalException as e:
        print(f"vae-dist: launch stopped by signal {int(e.sigval)} ({e.sigval.name}), passed on to every rank",
              file=sys.stderr)
        return 128 + int(e.sigval)
    except ValueError as e:  # accelerate's checks of the launch options, before any rank starts
        print(f"vae-dist: error: accelerate launch: {first_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
