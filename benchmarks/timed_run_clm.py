"""run_clm.py with a stopwatch: the same training, plus one timing record per optimizer step.

    deepspeed --num_gpus=1 benchmarks/timed_run_clm.py --timings steps.json <run_clm.py flags>
    python benchmarks/timed_run_clm.py --timings steps.json <run_clm.py flags>

Everything but --timings goes to run_clm.main() untouched; the only change is that its Trainer
class records each step (see stepclock.py) and writes the records to --timings at the end.
"""

import argparse
from pathlib import Path

import benchlib  # noqa: F401  (puts the repo root on sys.path, for run_clm)
import stepclock

import run_clm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--timings", type=Path, required=True, help="JSON file for the per-step timing records."
    )
    args, run_clm_argv = parser.parse_known_args()
    run_clm.GuardedTrainer = stepclock.timed(run_clm.GuardedTrainer, args.timings)
    run_clm.main(run_clm_argv)


if __name__ == "__main__":
    main()
