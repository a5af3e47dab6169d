"""The allocator tuning: megabyte buffers taken again without page faults, the operator's own
tuning left alone. Each case runs in a fresh interpreter, as the bot's start-up does."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from services.config import allocator_tuned_by_operator

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's allocator"
)

# Images of a load: rounds of 24 buffers of 1 MiB held at once, then freed, as the jobs of a
# burst hold their results; the page faults of the rounds after the first are counted.
LOAD = """
import json, resource, sys
from services.allocator import keep_image_buffers_on_the_heap
from services.config import allocator_tuned_by_operator

tuned = keep_image_buffers_on_the_heap(tuned_by_operator=allocator_tuned_by_operator()) if sys.argv[1] == "tune" else False

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

held = [bytearray(1 << 20) for _ in range(24)]
del held
before = faults()
for _ in range(20):
    held = [bytearray(1 << 20) for _ in range(24)]
    del held
print(json.dumps({"tuned": tuned, "faults": faults() - before}))
"""


def run_load(mode: str, **environment: str) -> dict[str, object]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("MALLOC_", "GLIBC_"))}
    done = subprocess.run(
        [sys.executable, "-c", LOAD, mode],
        cwd=ROOT,
        env={**env, **environment},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_tuned_heap_serves_image_buffers_again_without_page_faults() -> None:
    untuned, tuned = run_load("as-is"), run_load("tune")
    assert tuned["tuned"] is True
    # 480 MiB taken in all: untuned, glibc gives most of it back and faults it in again.
    assert isinstance(untuned["faults"], int) and untuned["faults"] > 50_000
    assert isinstance(tuned["faults"], int) and tuned["faults"] < untuned["faults"] / 5


@pytest.mark.parametrize("setting", ["MALLOC_TRIM_THRESHOLD_=1048576", "GLIBC_TUNABLES=glibc.malloc.trim_threshold=1"])
def test_operators_own_tuning_is_left_alone(setting: str) -> None:
    name, _, value = setting.partition("=")
    assert run_load("tune", **{name: value})["tuned"] is False


def test_the_operators_tuning_is_told_by_glibcs_own_variables() -> None:
    assert allocator_tuned_by_operator({"MALLOC_TOP_PAD_": "0"}) is True
    assert allocator_tuned_by_operator({"MALLOC_ARENA_MAX": "2", "DISCORD_TOKEN": "x"}) is False
