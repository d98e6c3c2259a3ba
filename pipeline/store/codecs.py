"""Compressor choices for kvmap store arrays (names in `extract.codec`), and the numcodecs-warning guard.

Measured on the default teacher's bf16 states (docs/benchmarks.md, benchmarks/bench_extract.py): the Zarr v3
spec's Blosc codec with zstd + byte shuffle and 1 MiB blocks ("blosc-zstd", the default) matches the ratio of
numcodecs' Shuffle + Zstd ("zstd-shuffle", the default before) and writes / reads faster.
"""

from __future__ import annotations

import contextlib
import warnings

import zarr
from zarr.codecs.numcodecs import Delta, Shuffle


@contextlib.contextmanager
def quiet_codecs():
    """Silence zarr's "Numcodecs codecs are not in the Zarr version 3 specification" warning.

    zarr emits it whenever an array using a numcodecs codec is created or opened. Still needed for the
    Delta filter of the top-k log-probs (no spec codec keeps their 3.2x ratio) and for stores written
    with "zstd-shuffle"; kvmap reads them with zarr-python (which ships the codecs), so the note is noise.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Numcodecs codecs are not in the Zarr", category=UserWarning
        )
        yield


BLOSC_BLOCKSIZE = 1 << 20
CODECS = ("blosc-zstd", "blosc-zstd-bit", "zstd-shuffle", "zstd", "blosc-lz4", "none")


def make_compressors(codec: str, level: int = 1, typesize: int = 2) -> list:
    """Zarr v3 compressor list for a codec name (one of `CODECS`; `typesize`: bytes per stored value).

    blosc-zstd (byte shuffle) / blosc-zstd-bit (bit shuffle) / blosc-lz4 / zstd are codecs of the Zarr v3
    spec; zstd-shuffle (numcodecs' Shuffle + zstd, the default before the spec codecs measured as well) is
    not, and zarr warns about it whenever such an array is opened.
    """
    if codec == "none":
        return []
    if codec == "zstd":
        return [zarr.codecs.ZstdCodec(level=level)]
    if codec in ("blosc-zstd", "blosc-zstd-bit", "blosc-lz4"):
        shuffle = "bitshuffle" if codec.endswith("-bit") else "shuffle"
        cname = "lz4" if codec == "blosc-lz4" else "zstd"
        # blocksize: blosc's automatic block (~32 KiB at clevel 1) cost 7% of the ratio on bf16 states;
        # whole inner chunks (capped at 1 MiB) match numcodecs' shuffle + zstd and encode faster.
        return [
            zarr.codecs.BloscCodec(
                cname=cname, clevel=level, shuffle=shuffle, typesize=typesize, blocksize=BLOSC_BLOCKSIZE
            )
        ]
    if codec == "zstd-shuffle":
        with quiet_codecs():
            return [Shuffle(elementsize=2), zarr.codecs.ZstdCodec(level=level)]
    raise ValueError(f"codec={codec!r}: expected one of {', '.join(CODECS)}")


def logit_codecs(level: int = 1) -> dict[str, dict]:
    """Filters/compressors per logits array (measured on the default teacher).

    values: numcodecs' Delta on the float16 words (outside the Zarr v3 spec: without it the ratio falls from
    3.2x to 1.8-2.0x, measured with blosc-zstd byte / bit shuffle) + blosc-zstd with byte shuffle (the same
    ratio as numcodecs' Shuffle + Zstd, 2.3x faster to write); indices: zstd (close to random; no shuffle
    helps).
    """
    with quiet_codecs():
        return {
            "values": {"filters": [Delta(dtype="u2")], "compressors": make_compressors("blosc-zstd", level)},
            "indices": {"filters": [], "compressors": [zarr.codecs.ZstdCodec(level=level)]},
        }
