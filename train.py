"""Train an instruct LLM as a text encoder with GRACE.

    python train.py                                      # built-in tiny model + data, CPU, a few minutes
    python train.py --model qwen2.5-1.5b --recipe grace  # GRACE's training exactly, on one 80 GB GPU
    python train.py --model qwen2.5-1.5b                 # the same with minigrace's reward, penalty, held-out eval
    python train.py --data my.jsonl --mode supervised --max-steps 200 --out runs/mine
    python train.py --help                               # every option with the default it takes, recipes, presets
"""
import sys

from minigrace.config import parse_args


def main() -> int:
    cfg, resume = parse_args()
    from minigrace.checkpoint import CheckpointError
    from minigrace.data import DataError
    from minigrace.models import ModelNotAvailable
    from minigrace.train import TrainingStopped
    from minigrace.train import main as train

    try:
        train(cfg, resume)
    except (ModelNotAvailable, DataError, CheckpointError, FileNotFoundError, PermissionError) as e:
        # a bad model or data path, a run directory in use or holding a run, a full disk, no checkpoint that verifies
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: abort without saving
        print("aborted (second Ctrl-C): nothing saved since the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
