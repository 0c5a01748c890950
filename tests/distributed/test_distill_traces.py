"""Trace distillation under DDP (2 CPU processes, gloo): the main process writes the teacher traces once, the other
rank waits at a barrier and trains on the same file."""

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_engines import torchrun  # noqa: E402


@pytest.mark.slow
def test_teacher_traces_written_once_under_ddp(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(4)))
    torchrun(HERE / "_distill_traces_worker.py", data, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == r["env_world_size"] == 2 for r in ranks)
    traces = [json.loads(line) for line in (tmp_path / "run" / "traces.jsonl").read_text().splitlines()]
    assert sorted(t["prompt_index"] for t in traces) == [0, 1, 2, 3]  # once per prompt, not once per rank
    assert ranks[0]["sha256"] == ranks[1]["sha256"] and ranks[0]["rows"] == ranks[1]["rows"] == 4
