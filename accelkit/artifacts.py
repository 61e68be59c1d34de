"""Artifact directories: the one on-disk layer every stage reads and writes.

A stage run writes one directory holding its files and a ``manifest.json``::

    {"kind": "couple", "format_version": 1, "accelkit_version": "0.1.0",
     "identity": "<sha256 of kind + recipe + input content hashes>",
     "recipe": {...fully resolved...}, "inputs": {"teacher": {"path": ..., "sha256": ...}},
     "seeds": {"seed": 0}, "status": "new" | "partial" | "complete", "progress": {...cursor...},
     "files": {"shard-00000.safetensors": {"sha256": ..., "bytes": ...}}, "summary": {...}}

Rules (DESIGN.md, "Artifacts and jobs"):

* The default output is content-addressed, ``runs/<stage>-<first 12 hex of identity>`` (``$ACCELKIT_RUNS`` replaces
  ``runs``). Opening the same stage on the same recipe and inputs again finds the directory ``complete`` (reuse) or
  ``partial`` (resume); a directory holding another recipe is refused unless ``force`` is given.
* Every write is atomic: a temporary name in the same directory, fsync, rename, fsync of the directory. A crash leaves
  the old file or the new one, never half of one. The manifest's ``complete`` status is written last.
* An exclusive ``flock`` on ``<dir>/.lock`` keeps a second job out while one runs; the second fails at once.
* :func:`verify` re-hashes every file against the manifest.

Recipe fields that do not change the result (batch size, checkpoint interval, device) stay out of the identity, so
a job resumed with another ``--batch-size`` continues the same artifact.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AccelkitError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
STATES = ("new", "partial", "complete")
#: Files at least this big have their hashes cached by (path, size, mtime) in the user's cache directory.
HASH_CACHE_MIN_BYTES = 16 << 20


# ----------------------------------------------------------------------------------------------------------- hashing

def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the byte string hashed for identities."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_cache_file() -> Path:
    root = os.environ.get("ACCELKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "accelkit")
    return Path(root) / "file-hashes.json"


def file_sha256(path: str | os.PathLike, use_cache: bool = True) -> str:
    """sha256 of a file's bytes. Big files' hashes are cached, keyed by (real path, size, mtime_ns)."""
    path = Path(path)
    st = path.stat()
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    cached = use_cache and st.st_size >= HASH_CACHE_MIN_BYTES
    if cached:
        with contextlib.suppress(OSError, ValueError):
            table = json.loads(_hash_cache_file().read_text())
            if key in table:
                return table[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if cached:
        with contextlib.suppress(OSError, ValueError):
            cache = _hash_cache_file()
            cache.parent.mkdir(parents=True, exist_ok=True)
            try:
                table = json.loads(cache.read_text())
            except (OSError, ValueError):
                table = {}
            table[key] = digest
            atomic_write_bytes(cache, json.dumps(table).encode())
    return digest


def _ignored(name: str) -> bool:
    return name == LOCK or name.startswith(TMP_PREFIX)


def content_hash(path: str | os.PathLike) -> str:
    """The content hash of an input: a file's sha256; for a directory, the sha256 over its sorted relative paths and
    file hashes. A complete artifact directory is hashed by its manifest's kind, identity and file hashes (its files
    are checked against those by :func:`verify` and by the readers)."""
    path = Path(path)
    if not path.exists():
        raise AccelkitError(f"input {str(path)!r} does not exist")
    if path.is_file():
        return file_sha256(path)
    manifest = path / MANIFEST
    if manifest.is_file():
        m = read_manifest(path)
        if m.get("status") != "complete":
            raise AccelkitError(f"input artifact {str(path)!r} is not complete (status {m.get('status')!r}): "
                                f"run its stage again to finish it")
        return sha256_bytes(canonical_json({"kind": m["kind"], "identity": m["identity"],
                                            "files": {k: v["sha256"] for k, v in m["files"].items()}}).encode())
    entries = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if _ignored(name):
                continue
            full = Path(root) / name
            entries.append([full.relative_to(path).as_posix(), file_sha256(full)])
    return sha256_bytes(canonical_json(entries).encode())


# ------------------------------------------------------------------------------------------------------ atomic writes

def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` keeps its old content (or stays absent).
    """
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success fsync its files and rename it to ``path``.

    An existing ``path`` is kept unless ``replace``: then it is moved aside first and deleted only after the new
    directory is in place (a crash in between leaves the old one under a ``.tmp-`` name, never half of the new).
    On an exception the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise AccelkitError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(Path(root) / name, "rb+") as f:
                    os.fsync(f.fileno())
            _fsync_dir(Path(root))
        if path.exists() or path.is_symlink():
            old = _tmp_name(path)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(old, path) if old is not None else None  # put the old one back
            raise
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp name in the same directory, fsync, rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> bytes:
    """A safetensors file's bytes, the same for the same tensors and metadata.

    safetensors writes its JSON header in hash-map order, so two saves of one dict can differ byte for byte. The
    header is parsed and written back with sorted keys, padded with spaces to its original length (the format pads
    the header to 8 bytes with spaces; reordering keys does not change the length). Metadata values that are not
    strings are stored as JSON.
    """
    from safetensors.torch import save

    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    raw = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta or None)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    encoded = header.encode()
    if len(encoded) > n:  # cannot happen for a header serde wrote compactly; keep the original rather than break it
        return raw
    return raw[:8] + encoded + b" " * (n - len(encoded)) + raw[8 + n:]


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
                     ) -> None:
    """Atomically save a dict of tensors, byte-for-byte reproducibly (see :func:`safetensors_bytes`)."""
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


# ------------------------------------------------------------------------------------------------------ manifest, lock

def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the artifact directory ``path``, with a clear error when there is none or it is unreadable."""
    path = Path(path)
    mfile = path / MANIFEST
    if not path.is_dir():
        raise AccelkitError(f"{str(path)!r} is not an artifact directory")
    if not mfile.is_file():
        raise AccelkitError(f"{str(path)!r} has no {MANIFEST}: not an accelkit artifact")
    try:
        m = json.loads(mfile.read_text())
    except ValueError as e:
        raise AccelkitError(f"{mfile}: unreadable manifest ({e})") from None
    for key in ("kind", "format_version", "identity", "status", "files"):
        if key not in m:
            raise AccelkitError(f"{mfile}: manifest lacks {key!r}")
    if m["format_version"] > FORMAT_VERSION:
        raise AccelkitError(f"{mfile}: format version {m['format_version']} is newer than this accelkit's "
                            f"({FORMAT_VERSION}); upgrade accelkit")
    return m


class DirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``<dir>/.lock``; the holder's pid is written into the file."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (pid {holder})" if holder else ""
                raise AccelkitError(f"{self.path.parent} is in use by another job{who}; wait for it to finish "
                                    f"or choose another output directory") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def runs_root() -> Path:
    """Where default outputs go: ``$ACCELKIT_RUNS`` or ``runs`` in the working directory."""
    return Path(os.environ.get("ACCELKIT_RUNS") or "runs")


def recipe_identity_view(recipe: Any, exclude: Collection[str] = ()) -> dict[str, Any]:
    """The part of a recipe that decides the result: a pydantic stage recipe's :meth:`identity_dict`, or a mapping
    without the ``exclude`` keys."""
    if hasattr(recipe, "identity_dict"):
        return recipe.identity_dict()
    return {k: v for k, v in dict(recipe).items() if k not in exclude}


def recipe_as_dict(recipe: Any) -> dict[str, Any]:
    if hasattr(recipe, "model_dump"):
        return recipe.model_dump(mode="json")
    return json.loads(json.dumps(dict(recipe)))


def identity_of(kind: str, recipe: Any, input_hashes: Mapping[str, str], exclude: Collection[str] = ()) -> str:
    """sha256 of the stage kind, the result-deciding recipe and the inputs' content hashes (not their paths)."""
    return sha256_bytes(canonical_json({"kind": kind, "recipe": recipe_identity_view(recipe, exclude),
                                        "inputs": dict(sorted(input_hashes.items()))}).encode())


def default_output(kind: str, identity: str) -> Path:
    return runs_root() / f"{kind}-{identity[:12]}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix or "(root)"]


def probe(path: str | os.PathLike, identity: str) -> str:
    """What opening ``path`` for ``identity`` would find, without locking: ``new``, ``partial``, ``complete`` or
    ``conflict`` (the directory holds another recipe or is not an artifact)."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not [p for p in os.listdir(path) if not _ignored(p)]):
        return "new"
    try:
        m = read_manifest(path)
    except AccelkitError:
        return "conflict"
    if m["identity"] != identity:
        return "conflict"
    return "complete" if m["status"] == "complete" else ("partial" if m["status"] == "partial" else "new")


class Artifact:
    """An open artifact directory, held under its lock while a stage writes it.

    Use :meth:`open` (a stage writing its output) or :meth:`read` (a stage reading an input). ``state`` is what the
    directory held when opened: ``new``, ``partial`` (resume from :attr:`progress`) or ``complete`` (reuse).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], state: str, lock: DirectoryLock | None):
        self.path = path
        self.manifest = manifest
        self.state = state
        self._lock = lock

    # -------------------------------------------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike | None,
        kind: str,
        recipe: Any,
        inputs: Mapping[str, str | os.PathLike] | None = None,
        *,
        force: bool = False,
        seeds: Mapping[str, Any] | None = None,
        exclude: Collection[str] = (),
        input_hashes: Mapping[str, str] | None = None,
    ) -> Artifact:
        """Open (create, resume or reuse) the artifact of stage ``kind`` for ``recipe`` on ``inputs``.

        ``recipe``: a :class:`accelkit.recipes.StageRecipe` (its execution fields stay out of the identity) or a
        mapping (``exclude`` names keys to leave out). ``inputs``: name -> file or directory; their content hashes
        enter the identity, their paths are recorded. ``path`` None: the content-addressed default. ``force``:
        discard a directory that holds another recipe's artifact. Raises :class:`AccelkitError` when the directory is
        in use, holds another recipe (without ``force``), or is a non-empty directory that is not an artifact.
        """
        inputs = {k: str(v) for k, v in (inputs or {}).items()}
        hashes = dict(input_hashes) if input_hashes is not None else {k: content_hash(v) for k, v in inputs.items()}
        identity = identity_of(kind, recipe, hashes, exclude)
        path = Path(path) if path is not None else default_output(kind, identity)
        if path.exists() and not path.is_dir():
            raise AccelkitError(f"output {str(path)!r} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(path)
        lock.acquire()
        try:
            state, manifest = cls._reconcile(path, kind, identity, force)
            if manifest is None:
                manifest = {
                    "kind": kind, "format_version": FORMAT_VERSION, "accelkit_version": __version__,
                    "identity": identity, "recipe": recipe_as_dict(recipe),
                    "inputs": {k: {"path": os.path.abspath(v), "sha256": hashes[k]} for k, v in inputs.items()},
                    "seeds": dict(seeds or {}), "status": "new", "progress": {}, "files": {}, "summary": {},
                    "created": _now(), "updated": _now(),
                }
            else:
                # Same identity: keep what decides the result, record this run's execution settings and paths.
                manifest["recipe"] = recipe_as_dict(recipe)
                for k, v in inputs.items():
                    manifest["inputs"].setdefault(k, {})["path"] = os.path.abspath(v)
            art = cls(path, manifest, state, lock)
            if state != "complete":
                art._clean_temporaries()
                art._write_manifest()
            return art
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _reconcile(path: Path, kind: str, identity: str, force: bool) -> tuple[str, dict[str, Any] | None]:
        contents = [p for p in os.listdir(path) if not _ignored(p)]
        if not contents:
            return "new", None
        if MANIFEST not in contents:
            raise AccelkitError(f"{path} exists, is not empty and is not an accelkit artifact (no {MANIFEST}); "
                                f"choose another output directory")
        m = read_manifest(path)
        if m["identity"] == identity:
            return ("complete" if m["status"] == "complete" else "partial" if m["status"] == "partial" else "new"), m
        if not force:
            if m["kind"] != kind:
                what = f"a {m['kind']!r} artifact"
            else:
                what = "an artifact of another recipe or other inputs"
            raise AccelkitError(f"{path} holds {what}; choose another output directory or pass --force to "
                                f"replace it")
        for name in contents:
            p = path / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return "new", None

    @classmethod
    def read(cls, path: str | os.PathLike, kind: str | None = None) -> Artifact:
        """A complete artifact opened for reading (no lock). Errors when it is not complete or of another kind."""
        path = Path(path)
        m = read_manifest(path)
        if kind is not None and m["kind"] != kind:
            raise AccelkitError(f"{path} is a {m['kind']!r} artifact; expected a {kind!r} artifact")
        if m["status"] != "complete":
            raise AccelkitError(f"{path} is not complete (status {m['status']!r}): run its stage again to resume it")
        return cls(path, m, "complete", None)

    @classmethod
    def attach(cls, path: str | os.PathLike) -> Artifact:
        """Another process's view of an artifact that a coordinating process holds open (e.g. torchrun ranks > 0):
        it may write files with ``record=False``; the holder records them and writes the manifest."""
        path = Path(path)
        return cls(path, read_manifest(path), "attached", None)

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def identity(self) -> str:
        return self.manifest["identity"]

    @property
    def recipe(self) -> dict[str, Any]:
        return self.manifest["recipe"]

    @property
    def seeds(self) -> dict[str, Any]:
        return self.manifest["seeds"]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    @property
    def status(self) -> str:
        return self.manifest["status"]

    @property
    def progress(self) -> dict[str, Any]:
        """The progress cursor stored in the manifest (a dict of plain values)."""
        return self.manifest["progress"]

    @progress.setter
    def progress(self, value: Mapping[str, Any]) -> None:
        self._check_writable()
        self.manifest["progress"] = dict(value)
        if self.manifest["status"] == "new":
            self.manifest["status"] = "partial"
        self._write_manifest()

    def file(self, name: str) -> Path:
        """The path of file ``name`` in the artifact."""
        return self.path / name

    # --------------------------------------------------------------------------------------------------- writes
    def _check_writable(self) -> None:
        if self._lock is None or self._lock.fd is None:
            raise RuntimeError("artifact is not open for writing")

    def _write_manifest(self) -> None:
        self.manifest["updated"] = _now()
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def _clean_temporaries(self) -> None:
        for name in os.listdir(self.path):
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    (self.path / name).unlink()

    def record_file(self, name: str, save: bool = True) -> str:
        """Hash file ``name`` (already in place) into the manifest; returns its sha256."""
        self._check_writable()
        p = self.file(name)
        digest = file_sha256(p, use_cache=False)
        self.manifest["files"][name] = {"sha256": digest, "bytes": p.stat().st_size}
        if self.manifest["status"] == "new":
            self.manifest["status"] = "partial"
        if save:
            self._write_manifest()
        return digest

    def forget_file(self, name: str, delete: bool = True) -> None:
        """Drop ``name`` from the manifest (and from disk)."""
        if name in self.manifest["files"]:
            self._check_writable()
            del self.manifest["files"][name]
            self._write_manifest()
        if delete:
            with contextlib.suppress(FileNotFoundError):
                self.file(name).unlink()

    def write_with(self, name: str, writer: Callable[[Path], None], record: bool = True) -> Path:
        """Atomically create file ``name`` by ``writer(temp_path)``; record its hash unless ``record`` is False."""
        if record:
            self._check_writable()
        with atomic_path(self.file(name)) as tmp:
            writer(tmp)
        if record:
            self.record_file(name)
        return self.file(name)

    def write_file(self, name: str, data: bytes, record: bool = True) -> Path:
        """Atomically write bytes to file ``name`` and record its hash."""
        return self.write_with(name, lambda tmp: tmp.write_bytes(data), record)

    def write_json(self, name: str, obj: Any, record: bool = True) -> Path:
        return self.write_file(name, (json.dumps(obj, indent=2) + "\n").encode(), record)

    def save_tensors(self, name: str, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                     record: bool = True) -> Path:
        """Atomically save a safetensors file ``name`` (tensors + string metadata) and record its hash."""
        if record:
            self._check_writable()
        save_safetensors(self.file(name), tensors, metadata)
        if record:
            self.record_file(name)
        return self.file(name)

    def load_tensors(self, name: str, verify: bool = True) -> dict[str, Any]:
        """Load safetensors file ``name``; with ``verify`` its hash must match the manifest's."""
        from safetensors.torch import load_file

        if verify:
            self.check_file(name)
        return load_file(str(self.file(name)))

    def check_file(self, name: str) -> None:
        """Raise a clear error when file ``name`` is missing or its hash differs from the manifest's."""
        problem = file_problem(self.path, name, self.manifest["files"].get(name))
        if problem:
            raise AccelkitError(problem)

    def complete(self, summary: Mapping[str, Any] | None = None) -> None:
        """Mark the artifact complete: every recorded file must exist; the manifest is written last."""
        self._check_writable()
        for name in self.manifest["files"]:
            if not self.file(name).is_file():
                raise AccelkitError(f"{self.path}: recorded file {name!r} is missing; cannot mark complete")
        if summary:
            self.manifest["summary"] = dict(summary)
        self.manifest["status"] = "complete"
        self.state = "complete"
        self._write_manifest()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Artifact:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, kind={self.kind!r}, state={self.state!r})"


# ---------------------------------------------------------------------------------------------------- verification

def open_on_rank0(rank: int, path: str | os.PathLike | None, kind: str, recipe: Any, *, force: bool = False,
                  seeds: Mapping[str, Any] | None = None) -> tuple[Artifact | None, Path, str, dict[str, Any]]:
    """Open a stage's artifact under torchrun: rank 0 opens it (create, resume or reuse, holding the lock) and every
    rank gets (the artifact on rank 0 else None, its path, its state, its recorded files). An error on rank 0 is
    raised on every rank, so no process is left waiting. Without torch.distributed this is :meth:`Artifact.open`."""
    from .jobs import broadcast_object

    art: Artifact | None = None
    opened: Any = None
    if rank == 0:
        try:
            art = Artifact.open(path, kind, recipe, recipe.inputs(), force=force, seeds=seeds)
            opened = (str(art.path), art.state, art.files)
        except AccelkitError as e:
            opened = e
    opened = broadcast_object(opened)
    if isinstance(opened, AccelkitError):
        raise opened
    return art, Path(opened[0]), opened[1], opened[2]


def file_problem(directory: Path, name: str, entry: Mapping[str, Any] | None) -> str | None:
    """None when ``directory/name`` matches its manifest entry, else a one-line description of what is wrong."""
    p = Path(directory) / name
    if entry is None:
        return f"{p}: not recorded in the manifest"
    if not p.is_file():
        return f"{p}: missing (recorded in the manifest)"
    size = p.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        return f"{p}: size {size} bytes, manifest records {entry['bytes']}: the file is damaged"
    digest = file_sha256(p, use_cache=False)
    if digest != entry["sha256"]:
        return f"{p}: sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}...: " \
               f"the file is damaged"
    return None


def verify(path: str | os.PathLike) -> list[str]:
    """Check every file of an artifact against its manifest; returns the problems (empty when all is well)."""
    path = Path(path)
    m = read_manifest(path)
    problems = [p for name, entry in sorted(m["files"].items()) if (p := file_problem(path, name, entry))]
    if m["status"] != "complete":
        problems.append(f"{path}: status is {m['status']!r}, not complete")
    return problems


__all__ = [
    "Artifact", "FORMAT_VERSION", "MANIFEST", "content_hash", "file_sha256", "atomic_path", "atomic_directory",
    "atomic_write_bytes", "atomic_write_json", "save_safetensors", "read_manifest", "verify", "file_problem",
    "identity_of", "default_output", "runs_root", "probe", "canonical_json", "DirectoryLock",
]
