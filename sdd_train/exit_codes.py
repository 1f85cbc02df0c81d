"""Exit codes of every command: what a launcher, a sweep or Slurm can tell apart."""

EXIT_OK = 0  # success, also after a SIGTERM/SIGUSR1 stop that saved a checkpoint
EXIT_FAILURE = 1  # anything else (a bug, a lost rank, a full disk that stopped the run)
EXIT_CONFIG = 2  # a configuration, data or usage error, found before anything was written
EXIT_DIVERGED = 3  # NaN/Inf loss or gradient with train.nonfinite=stop (nothing non-finite is checkpointed)
