"""llm_flow.models.memory: once a model is wrapped, a tensor the size of a long prompt's attention
pattern comes from the heap (reused pass after pass) instead of a fresh mmap the kernel must
page in again every time. Run in a fresh process: the setting is per process and sticks."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

PROBE = """
import torch
from llm_flow.models import wrap_hf
from tests.tiny import tiny_hf_model, tiny_tokenizer

def from_heap() -> bool:
    tensor = torch.empty(64 << 20, dtype=torch.uint8)  # above glibc's largest mmap threshold
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= address < high:
                return True
    return False

print(from_heap())
wrap_hf("llama-gqa", tiny_hf_model("llama-gqa"), tiny_tokenizer(), device=None, dtype=torch.float32)
print(from_heap())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_a_wrapped_model_takes_large_tensors_from_the_heap() -> None:
    shown = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert shown == ["False", "True"]
