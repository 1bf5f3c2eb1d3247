"""Loading at a small budget must not hold all experts, not even for a moment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.synthetic import build_model

MiB = 2**20

FULL = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from expertswap.engine.observe.memory import peak_rss_bytes
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(json.dumps({"peak": peak_rss_bytes()}))
"""
OURS = """
import json, sys
from expertswap.engine import Engine
from expertswap.engine.observe.memory import peak_rss_bytes
engine = Engine.load(sys.argv[1], budget="25%")
print(json.dumps({"peak": peak_rss_bytes(), "total": engine.total_expert_bytes,
                  "resident": engine.resident_expert_bytes()}))
"""
BARE = """
import json, torch, transformers, expertswap.engine
from expertswap.engine.observe.memory import peak_rss_bytes
print(json.dumps({"peak": peak_rss_bytes()}))
"""


def _peak(script: str, *args: str) -> dict[str, int]:
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_at_quarter_budget(tmp_path: Path) -> None:
    folder = build_model("qwen3_moe", tmp_path / "big", num_experts=48, layers=3, hidden=256, intermediate=512,
                         heads=4)
    bare = _peak(BARE)["peak"]
    full = _peak(FULL, str(folder))["peak"] - bare
    ours = _peak(OURS, str(folder))
    total, resident = ours["total"], ours["resident"]
    assert total >= 200 * MiB
    assert resident <= total // 4
    grown = ours["peak"] - bare
    print(f"\nexperts {total / MiB:.0f} MiB; over a bare import: full load +{full / MiB:.0f} MiB, "
          f"ExpertSwap 25% +{grown / MiB:.0f} MiB (resident experts {resident / MiB:.0f} MiB)")
    assert full >= total, "the plain load should hold every expert"
    assert grown < resident + 0.25 * total, "loading must not materialise the experts it does not keep"


def test_dropped_file_pages_leave_the_resident_set_and_read_back_intact(tmp_path) -> None:
    """What the engine does to weights it has copied (packed, fused) out of the checkpoint's memory map."""
    import re
    import sys

    import numpy as np
    import pytest
    import torch

    from expertswap.engine.weights.host_memory import drop_file_pages

    if not sys.platform.startswith("linux"):
        pytest.skip("madvise on file mappings is the Linux measure")
    path = tmp_path / "weights.bin"
    np.arange(16 << 20, dtype=np.float32).tofile(path)  # 64 MiB
    mapped = np.memmap(path, dtype=np.float32, mode="c")  # private, as safetensors maps
    tensor = torch.from_numpy(np.asarray(mapped))  # a view of the map, as transformers leaves weights
    total = float(tensor.sum())  # every page touched: resident

    def resident_kib() -> int:
        kib, inside = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                kib += int(line.split()[1])
        return kib

    assert resident_kib() > 60 << 10
    assert drop_file_pages([tensor]) >= (64 << 20) - 8192
    assert resident_kib() < 1 << 10
    assert float(tensor.sum()) == total  # clean file pages come back from the file
    assert drop_file_pages([torch.ones(1 << 20)]) == 0  # never heap memory


def test_no_page_of_the_checkpoint_stays_mapped_after_load_and_a_reply(tmp_path) -> None:
    """The engine holds its own copy of every weight: the file map would keep what faults pulled in."""
    import re
    import sys

    import pytest
    import torch

    from expertswap.engine import Engine
    from expertswap.protocol import SamplingSettings
    from tools.synthetic import build_model

    if not sys.platform.startswith("linux"):
        pytest.skip("the Linux measures")
    folder = build_model("qwen2_moe", tmp_path / "model", dtype=torch.bfloat16)  # its own (others map theirs)

    def mapped_kib() -> int:
        kib, inside = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = "model" in line and line.rstrip().endswith(".safetensors") and str(folder) in line
            elif inside and line.startswith("Rss:"):
                kib += int(line.split()[1])
        return kib

    with Engine.load(folder, budget="50%", dtype="bfloat16", swapper=False) as engine:
        list(engine.generate(engine.encode("a prompt of a few words"), SamplingSettings(max_new_tokens=4)))
        assert mapped_kib() == 0
