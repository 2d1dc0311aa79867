"""Two processes (``torchrun --nproc_per_node 2``, gloo on the CPU) split the prompts and write one report that
equals a single-process run's."""

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import build_tiny_pixart_pipeline
from eval_helpers import small_config

from accel.eval.harness import run_evaluation

TESTS = Path(__file__).parent

DRIVER = """
import json, sys
sys.path.insert(0, {tests!r})
from accelerate import PartialState
import accel.eval.harness as harness
from eval_helpers import small_config

calls = []
generate = harness.generate

def counting(pipe, prompts, *args, **kwargs):
    calls.append(list(prompts))
    return generate(pipe, prompts, *args, **kwargs)

harness.generate = counting  # test instrumentation: which process generated which prompts
harness.run_evaluation(small_config(model={model!r}, methods=("full", "fora-2"), batch_size=1), {out!r})
with open({out!r} + f"/calls-{{PartialState().process_index}}.json", "w") as file:
    json.dump(calls, file)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_two_processes_split_the_prompts_and_match_one_process(tmp_path):
    model = tmp_path / "model"
    build_tiny_pixart_pipeline().save_pretrained(model)
    out = tmp_path / "two"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER).format(tests=str(TESTS), model=str(model), out=str(out)))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(driver)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["run"]["num_processes"] == 2
    calls = [json.loads((out / f"calls-{rank}.json").read_text()) for rank in (0, 1)]
    prompts = list(results["run"]["config"]["prompts"])
    # image generation: ranks 0 and 1 each did half the prompts, per method; rank 0 also timed (batch 1)
    assert [c[0] for c in calls[1]] == prompts[2:] * 2
    assert [c[0] for c in calls[0][:2]] == prompts[:2]

    single = run_evaluation(small_config(model=str(model), methods=("full", "fora-2"), batch_size=1), tmp_path / "one")
    for two, one in zip(results["trials"], single["trials"]):
        assert two["key"] == one["key"]
        assert two["metrics"]["PSNR"] == one["metrics"]["PSNR"]
        for image in sorted((out / two["images"]).glob("*.png")):
            assert image.read_bytes() == (tmp_path / "one" / one["images"] / image.name).read_bytes()
