"""Stage 1 on a CUDA device: the overlapped device->host copies (pipeline/extraction/host_copy.py) place every
batch's rows where the plain CPU path does. Skipped without CUDA.

A wrong staging slot, a copy read before its event or a batch placed twice would put another batch's states
in the chunk: far beyond the tolerance, which only allows CPU vs GPU matmul rounding (fp32 teacher, states
stored as bf16: one bf16 step, 2^-8 relative).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.extraction.chunk import extract_chunk
from pipeline.models.capture import capture_qkv
from tests.conftest import tiny_llama_config
from tests.helpers_store import random_split

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _bf16(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.view(np.int16)).view(torch.bfloat16).float()


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_cuda_chunk_equals_cpu_chunk(dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="sdpa").eval()
    packed = random_split(12, seed=3)
    start, end = 10, 10 + 160  # several batches of 2, samples cut at both edges
    out = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        with torch.inference_mode(), capture_qkv(model, [0, 2], ("q", "k", "v")) as cap:
            out[device] = extract_chunk(
                model, cap, packed, start, end, [0, 2], ["q", "k", "v"], dtype, 2, 0, top_k=8
            )
    (cpu, s_cpu), (gpu, s_gpu) = out["cpu"], out["cuda"]
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        a, b = cpu[key], gpu[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if key == ("logits", "indices"):
            assert (a[:, :4] == b[:, :4]).mean() > 0.99, key  # the top ids (ties aside)
        elif key == ("logits", "values"):  # float16 words of sorted log-probs
            assert np.allclose(a.view(np.float16), b.view(np.float16), atol=2e-2), key
        elif dtype == "bfloat16":
            x, y = _bf16(a), _bf16(b)
            assert torch.allclose(x, y, rtol=2**-7, atol=1e-3), key
        else:
            assert np.abs(a.astype(np.float64) - b.astype(np.float64)).max() <= 2, key  # int8 words / scales
    assert s_cpu["acc"] == s_gpu["acc"] and s_cpu["forward_tokens"] == s_gpu["forward_tokens"]
    for k, v in s_cpu["ce"].items():
        assert v == pytest.approx(s_gpu["ce"][k], rel=1e-4)
