"""Where a kvmap store lives: a local folder or an object-storage URL, behind one small interface.

    StoreLocation("stores/default.zarr")
    StoreLocation("s3://bucket/prefix/default.zarr", {"endpoint_url": "http://127.0.0.1:9000"})
    StoreLocation("memory://tests/x.zarr")   # fsspec's in-process memory filesystem (tests)

Why one module: stage 1 and stage 2 touch a store outside zarr's array API in a few places (does it exist,
read its root metadata before opening it, write / list / delete the per-chunk done-markers, delete a store
for `--overwrite`, measure stored bytes). Each of those goes through here, so that a URL works wherever a
folder does. Everything is a key relative to the store root ("zarr.json", "_kvmap_progress/chunk_0000003.json")
and goes through the zarr store object itself (`zarr.storage.LocalStore` or `zarr.storage.FsspecStore`):
LocalStore writes every object atomically (temporary file + rename) and an object-store PUT is atomic, so
a done-marker is either whole or absent on both.

Credentials never pass through here as config: `storage_options` (fsspec keyword arguments such as
`endpoint_url`, `region_name`, `anon`) are checked by `check_storage_options`, which refuses secret-looking
keys; fsspec / botocore read credentials from the environment (AWS_ACCESS_KEY_ID, ...), so nothing secret
ends up in the store attributes, a run folder's config.yaml or the logs. `str()` / `repr()` show the URL only.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

# Substrings of storage_options keys that would carry a secret (matched case-insensitively, nested too).
SECRET_KEY_PARTS = ("secret", "password", "token", "credential", "access_key", "key_id", "session")


def is_url(location: str | Path) -> bool:
    """True for `scheme://...` locations (s3://, gs://, memory://); False for local paths."""
    return "://" in str(location) and not str(location).startswith("file://")


def check_storage_options(options: Any, key: str = "extract.storage_options") -> dict:
    """Validate `storage_options`: a mapping without credentials (those come from the environment).

    Raises a one-line ValueError naming `key` and the offending entry.
    """
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"{key}={options!r}: expected a mapping of fsspec options (e.g. endpoint_url)")

    def walk(d: dict, where: str) -> None:
        for k, v in d.items():
            if any(part in str(k).lower() for part in SECRET_KEY_PARTS) or str(k).lower() in (
                "key",
                "secret",
            ):
                raise ValueError(
                    f"{key}: {where}{k!r} looks like a credential: expected credentials in the environment "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE ...), never in the config"
                )
            if isinstance(v, dict):
                walk(v, f"{where}{k}.")

    walk(options, "")
    return dict(options)


class StoreLocation:
    """A store root (local folder or URL) plus fsspec `storage_options`; picklable, credential-free.

    Args:
        location: a local path, a URL (`s3://bucket/key.zarr`, `memory://x.zarr`) or another StoreLocation.
        storage_options: fsspec options for URLs (ignored for local folders); see `check_storage_options`.
    Example:
        loc = StoreLocation("s3://bkt/stores/default.zarr", {"endpoint_url": "http://127.0.0.1:9000"})
        loc.exists()  # True once zarr.json is there
    """

    def __init__(self, location: str | Path | StoreLocation, storage_options: dict | None = None):
        if isinstance(location, StoreLocation):
            storage_options = location.storage_options if storage_options is None else storage_options
            location = location.url
        self.remote = is_url(location)
        self.url = str(location) if self.remote else str(Path(str(location).removeprefix("file://")))
        self.storage_options = check_storage_options(storage_options) if self.remote else {}
        self._stores: dict[bool, Any] = {}

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"StoreLocation({self.url!r})"

    def __fspath__(self) -> str:
        # Local stores keep working with code that takes a path (Path(store.path), sidecar files); a URL is
        # not a path, so os.fspath refuses it rather than making a local folder named "s3:".
        if self.remote:
            raise TypeError(f"store '{self.url}' is a URL, not a local path")
        return self.url

    def __eq__(self, other) -> bool:
        return isinstance(other, StoreLocation) and (self.url, self.storage_options) == (
            other.url,
            other.storage_options,
        )

    def __hash__(self) -> int:
        return hash(self.url)

    def __getstate__(self) -> dict:
        return {
            "url": self.url,
            "remote": self.remote,
            "storage_options": self.storage_options,
            "_stores": {},
        }

    @property
    def name(self) -> str:
        """The last path component (e.g. `default.zarr`)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def local_path(self) -> Path:
        """The folder of a local store (ValueError for a URL: callers that need a folder say so)."""
        if self.remote:
            raise ValueError(f"store '{self.url}' is not a local folder")
        return Path(self.url)

    def zarr_store(self, read_only: bool = True):
        """The zarr store object (LocalStore / FsspecStore) for this root; one per mode, reused."""
        if read_only not in self._stores:
            if self.remote:
                self._stores[read_only] = zarr.storage.FsspecStore.from_url(
                    self.url, storage_options=dict(self.storage_options), read_only=read_only
                )
            else:
                if not read_only:
                    Path(self.url).mkdir(parents=True, exist_ok=True)
                self._stores[read_only] = zarr.storage.LocalStore(self.url, read_only=read_only)
        return self._stores[read_only]

    def open_group(self, mode: str = "r", **kw) -> zarr.Group:
        """`zarr.open_group` on this root (mode "r", "r+", "w-", "w")."""
        return zarr.open_group(self.zarr_store(read_only=mode == "r"), mode=mode, **kw)

    def _invalidate(self) -> None:
        # fsspec caches directory listings per filesystem instance; another process (a second rank, a
        # killed run) may have written since, so listings are always fetched fresh.
        for st in self._stores.values():
            fs = getattr(st, "fs", None)
            if fs is not None:
                fs.invalidate_cache()

    def exists(self, key: str = "zarr.json") -> bool:
        """Whether the object `key` exists (default: the root metadata, i.e. "is this a zarr group")."""
        if not self.remote and not Path(self.url).is_dir():
            return False
        self._invalidate()
        return bool(sync(self.zarr_store().exists(key)))

    def read_bytes(self, key: str) -> bytes | None:
        """The object `key`, or None when absent."""
        if not self.remote and not Path(self.url).is_dir():
            return None
        buf = sync(self.zarr_store().get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def read_json(self, key: str) -> Any:
        """The JSON object `key`, or None when it does not exist."""
        raw = self.read_bytes(key)
        return None if raw is None else json.loads(raw)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write the object `key` whole (atomic: see the module docstring)."""
        store = self.zarr_store(read_only=False)
        sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def write_json(self, key: str, obj: Any) -> None:
        """Write `obj` as the JSON object `key` (atomic, like `write_bytes`)."""
        self.write_bytes(key, json.dumps(obj).encode())

    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to the root) of every object under `prefix`."""
        if not self.remote:
            root = Path(self.url)
            base = root / prefix
            if not base.is_dir():
                return []
            return sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file())
        self._invalidate()
        store = self.zarr_store()

        async def collect():
            return [k async for k in store.list_prefix(prefix)]

        return sorted(sync(collect()))

    def is_empty(self) -> bool:
        """True when nothing is stored under the root (a missing folder counts as empty)."""
        return not self.list("")

    def size(self, prefix: str = "", skip_metadata: bool = True) -> int:
        """Stored bytes under `prefix` (by default without the zarr.json metadata objects)."""
        if not self.remote:
            base = Path(self.url) / prefix
            if not base.is_dir():
                return 0
            return sum(
                p.stat().st_size
                for p in base.rglob("*")
                if p.is_file() and not (skip_metadata and p.name == "zarr.json")
            )
        self._invalidate()
        st = self.zarr_store()
        root = f"{st.path}/{prefix}".rstrip("/")
        try:
            found = sync(st.fs._find(root, detail=True, withdirs=False))
        except FileNotFoundError:
            return 0
        return sum(
            int(info.get("size") or 0)
            for name, info in found.items()
            if name.startswith(root + "/") and not (skip_metadata and name.rsplit("/", 1)[-1] == "zarr.json")
        )

    def delete(self, prefix: str = "") -> None:
        """Delete every object under `prefix` ("" = the whole store)."""
        store = self.zarr_store(read_only=False)
        if prefix:
            sync(store.delete_dir(prefix))
            return
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                sync(store.fs._rm(store.path, recursive=True))
            self._invalidate()
        else:
            shutil.rmtree(self.url, ignore_errors=False)
        self._stores.clear()


def remove_store(path: str | Path | StoreLocation, storage_options: dict | None = None) -> None:
    """Delete a store (folder or URL), refusing anything that is not a kvmap store (guards `--overwrite`)."""
    loc = StoreLocation(path, storage_options)
    if loc.is_empty():
        if not loc.remote and Path(loc.url).is_dir():
            shutil.rmtree(loc.url)
        return
    meta = loc.read_json("zarr.json") or {}
    if "schema_version" not in meta.get("attributes", {}):
        raise ValueError(f"--overwrite: '{loc}' exists and is not a kvmap store; refusing to delete it")
    loc.delete()
