"""Device -> host copies of one batch's gathered teacher states, overlapped with the next batch's forward.

Shape glossary: N real tokens of a batch landing in the chunk, X heads of a component, D head dim, K keys of
a batch (one per (layer, component) and the logits entries).

Why: stage 1 at GPU scale is bound by what happens after the forward. Copying the states to the host on the
compute stream and waiting for them (or any `.item()`-style read) stalls the GPU while the CPU copies hundreds
of MB into the chunk's buffers. Here the copies of batch i run on a side stream into page-locked staging
buffers while batch i + 1's forward runs; the CPU waits only on batch i's copy event (not on the compute
stream) and then places batch i's rows. Two staging sets alternate, so batch i + 1's copy never overwrites
what batch i's placement still reads. On the CPU the gathered tensors already are the host copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class InFlight:
    """One batch between its device->host copy and its placement into the chunk's buffers.

    host: {key: staging tensor (N, ...)} (pinned on CUDA); finite: (K_states,) bool host tensor, one flag per
    state key, from the device check; keep: the device tensors the copy reads (kept alive until it is done);
    event: the copy stream's event (None on CPU); meta: what the placement needs (rows, the error's context).
    """

    host: dict
    finite: torch.Tensor | None
    keep: list
    event: object | None
    meta: dict = field(default_factory=dict)


class HostCopier:
    """Starts asynchronous device->host copies (`start`) and hands them back as numpy (`wait`)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._staging: list[dict] = [{}, {}]  # two alternating sets of page-locked buffers, grown on demand

    def _buffer(self, slot: int, key, like: torch.Tensor) -> torch.Tensor:
        bufs = self._staging[slot]
        buf = bufs.get(key)
        n = like.shape[0]
        if buf is None or buf.shape[1:] != like.shape[1:] or buf.dtype != like.dtype or buf.shape[0] < n:
            # allocating pinned memory costs about as much as the copy it speeds up: reuse, grow to the largest
            buf = bufs[key] = torch.empty((max(n, 1), *like.shape[1:]), dtype=like.dtype, pin_memory=True)
        return buf[:n]

    def start(self, ys: dict, finite: torch.Tensor | None, slot: int, meta: dict) -> InFlight:
        """Copy `ys` {key: device tensor (N, ...)} and the finite flags to the host, asynchronously on CUDA."""
        if not self.cuda:
            return InFlight(dict(ys), finite, [], None, meta)
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)  # the gathers of this batch were queued on the compute stream
        host = {}
        with torch.cuda.stream(self.stream):
            for key, y in ys.items():
                host[key] = self._buffer(slot, key, y).copy_(y, non_blocking=True)
            flags = None
            if finite is not None:
                flags = self._buffer(slot, "__finite__", finite).copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return InFlight(host, flags, [*ys.values(), finite], event, meta)

    def wait(self, job: InFlight) -> dict[tuple, np.ndarray]:
        """Block until `job`'s copies are done (not the compute stream); its arrays as numpy (bf16 as uint16
        words). The numpy arrays are views of staging buffers reused two batches later: copy what is kept."""
        if job.event is not None:
            job.event.synchronize()
        job.keep.clear()
        return {
            k: (h.view(torch.uint16) if h.dtype == torch.bfloat16 else h).numpy() for k, h in job.host.items()
        }
