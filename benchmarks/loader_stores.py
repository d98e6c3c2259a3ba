"""bench_train.py --stores BF16,INT8: the trainer's DataLoader on a bf16 store, an int8 store and the bf16 store
on a local S3 server (moto, its own process) in the global sample order and in the shard-window order
(`train.shuffle=shards`: whole-shard reads through a cache), plus what the trainer's cached step consumes.

Shape glossary: B batch. Loader samples/s exclude worker start-up (the first batch); every loader reads the
mapped layers' teacher states (`train.preload` off: the reads themselves) with `--workers` workers. Rounds
interleave the three loaders (medians over `--rounds`), so a load swing on a shared machine hits them alike.
Bars (stores at scale): int8 loader / bf16 loader >= 1.0; S3 loader >= 3x the cached step's consumption (reported:
S3 / local folder). Use `--steps` >= one epoch of batches so the shard-window loaders fetch every shard
inside the timed part.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(bucket: str = "kvmap-bench"):
    """A moto S3 server in its own process (fake credentials + AWS_ENDPOINT_URL in this env): (proc, fs)."""
    import s3fs

    port = _free_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for _ in range(200):
        try:
            fs.mkdir(bucket)
            return proc, fs
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def loader_rate(stepper_cls, cfg, store, B: int, batches: int) -> float:
    """Samples/s of the trainer's DataLoader alone over `batches` batches (after the first)."""
    st = stepper_cls("loader", cfg, store, B, batches + 1)
    next(st.batches)  # worker start-up is not throughput
    t0, n = time.perf_counter(), 0
    for batch in st.batches:
        n += batch["input_ids"].shape[0]
    rate = n / (time.perf_counter() - t0)
    st.close()
    return rate


def preload_seconds(where: str) -> float:
    """Seconds to read the train split's states whole into RAM (`train.preload`; one read per shard)."""
    from pipeline.store.reader import KVStore
    from trainer.data.preload import PreloadedSplit

    t0 = time.perf_counter()
    st = KVStore(where)
    PreloadedSplit(st, "train", st.layers, st.components)
    return time.perf_counter() - t0


def consumption(stepper_cls, cfg, store, B: int, warmup: int, steps: int) -> float:
    """Samples/s the cached distillation step consumes (median step time, the config's own loader)."""
    st = stepper_cls("cached", cfg, store, B, warmup + steps)
    times = [st.step() for _ in range(warmup + steps)][warmup:]
    st.close()
    return B / statistics.median(times)


def run_stores(args, overrides, stepper_cls, setup) -> dict:
    """Loader samples/s per store (medians of `args.rounds`) and the cached step's consumption."""
    from pipeline.store.location import StoreLocation
    from trainer.run.store_checks import open_store

    bf16, *int8 = args.stores.split(",")  # the int8 store is optional (S3 rows only without it)
    proc, fs = start_s3()
    try:
        url = "s3://kvmap-bench/stores/bf16.zarr"
        fs.put(bf16, url.removeprefix("s3://"), recursive=True)
        loader_over = ["train.preload=false", f"train.num_workers={args.workers}", f"train.store={bf16}"]
        cfg, _, B = setup(args, [*overrides, *loader_over])
        stores = {"bf16": bf16, **({"int8": int8[0]} if int8 else {}), "s3_bf16": url, "s3_bf16_shards": url}
        rates = {k: [] for k in stores}
        for _ in range(args.rounds):
            for name, where in stores.items():
                cfg.train.store = where
                cfg.train.shuffle = "shards" if name.endswith("_shards") else "global"
                rates[name].append(
                    loader_rate(stepper_cls, cfg, open_store(StoreLocation(where)), B, args.steps)
                )
                print(f"  {name}: {rates[name][-1]:.1f} samples/s", flush=True)
        preload = {
            name: statistics.median(preload_seconds(w) for _ in range(args.rounds))
            for name, w in stores.items()
            if not name.endswith("_shards")
        }
        print("  preload s: " + "  ".join(f"{k} {v:.2f}" for k, v in preload.items()), flush=True)
        cfg_step, store, _ = setup(args, [*overrides, f"train.store={bf16}"])
        eat = consumption(stepper_cls, cfg_step, store, B, args.warmup, args.steps)
    finally:
        proc.kill()
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"batch_size": B, "workers": args.workers, "rounds": args.rounds, "samples_per_s": med,
            "all": rates, "cached_consumes_samples_per_s": eat, "preload_s": preload}  # fmt: skip


def print_stores(r: dict) -> None:
    m, eat = r["samples_per_s"], r["cached_consumes_samples_per_s"]
    print(
        f"loader samples/s (median of {r['rounds']}, {r['workers']} workers, batch {r['batch_size']}): "
        + "  ".join(f"{k} {v:.1f}" for k, v in m.items())
        + f"; cached step consumes {eat:.1f} samples/s"
    )
    print(
        "train.preload (whole split into RAM), seconds: "
        + "  ".join(f"{k} {v:.2f}" for k, v in r["preload_s"].items())
    )
    bars = [
        *([("int8 / bf16 loader samples/s", m["int8"] / m["bf16"], ">=", 1.0)] if "int8" in m else []),
        ("S3 (moto) / local folder loader samples/s (report)", m["s3_bf16"] / m["bf16"], ">=", 0.0),
        ("S3 loader, global order / cached step consumption", m["s3_bf16"] / eat, ">=", 3.0),
        ("S3 loader, train.shuffle=shards / cached step consumption", m["s3_bf16_shards"] / eat, ">=", 3.0),
        (
            "S3 shards / local folder (global order) loader samples/s (report)",
            m["s3_bf16_shards"] / m["bf16"],
            ">=",
            0.0,
        ),
        *([("int8 loader / cached step consumption", m["int8"] / eat, ">=", 3.0)] if "int8" in m else []),
    ]
    for name, value, op, bar in bars:
        ok = value >= bar
        print(f"  {name:<64} {value:7.3f}  (bar {op} {bar})  {'PASS' if ok else 'MISS'}")
