"""Where a cache lives: a local folder or an fsspec URL, opened with the store's own credentials.

Supported locations: plain paths and `file://`, `s3://BUCKET/PREFIX` (s3fs; any S3-compatible store through
the standard `AWS_ENDPOINT_URL`), `gs://BUCKET/PREFIX` (gcsfs) and `hf://datasets/ORG/NAME[@REVISION][/PREFIX]`
(huggingface_hub). Credentials come only from each store's standard environment variables and config files,
never from the URL. Everything this module prints or raises goes through `redact`, so no key, token or signed
URL reaches a terminal, a log, a manifest or a provenance file.

A remote cache is untrusted: every relative path read from it (a listing, a manifest) passes `confine`, which
allows only plain relative paths below the cache root.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlsplit

from cache_builder.manifest import CacheError

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
              "GOOGLE_OAUTH_ACCESS_TOKEN")
PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "hf": "huggingface_hub", "http": "aiohttp", "https": "aiohttp"}
CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for an "
          "S3-compatible store such as MinIO, Ceph or R2",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`",
    "hf": "set HF_TOKEN or run `hf auth login`",
}
_PATTERNS = (
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s'\"]+@"), r"\1***@"),  # user:password@ in any URL
    (re.compile(r"(\bhttps?://[^\s?'\"]+)\?[^\s'\"]*"), r"\1?***"),  # query strings: signed URLs
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), "hf_***"),  # Hugging Face tokens
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"), r"\1***"),  # AWS access key ids
)


class RemoteError(CacheError):
    """A location that cannot be used; the message is one line, redacted, and names the fix."""


def redact(text: str) -> str:
    """`text` without credentials: URL user info, query strings (signatures), tokens, secret env values."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 6:
            text = text.replace(value, "***")
    return text


def confine(relpath: object, where: str) -> str:
    """`relpath` if it is a plain relative POSIX path below a cache root, else RemoteError naming `where`."""
    if not isinstance(relpath, str) or not relpath or len(relpath) > 1024:
        raise RemoteError(f"{where}: path {relpath!r} is not a relative path")
    parts = relpath.split("/")
    if (relpath.startswith("/") or "\\" in relpath or "://" in relpath or ":" in relpath
            or any(ord(c) < 32 for c in relpath)):
        raise RemoteError(redact(f"{where}: path {relpath!r} is absolute or a URL; a cache may only name its own files"))
    if any(p in ("..", ".", "") for p in parts):
        raise RemoteError(f"{where}: path {relpath!r} points outside the cache; a cache may only name its own files")
    return relpath


@dataclass(frozen=True)
class Location:
    """An opened cache location. `root` is the fsspec path of the cache root (for the Hub: with the pinned
    commit); `url` is what the user gave, redacted; `revision` is the pinned Hub commit (None elsewhere)."""

    url: str
    protocol: str  # "file", "s3", "gs", "hf", "http", "https"
    root: str
    fs: object  # fsspec.AbstractFileSystem
    revision: str | None = None
    repo_id: str | None = None  # the Hub dataset repository, for commits

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def path(self, relpath: str) -> str:
        """The fsspec path of a file below the root (relpath must be confined)."""
        return f"{self.root}/{relpath}" if relpath else self.root

    def in_repo(self, relpath: str) -> str:
        """A file's path inside the Hub repository (the root is datasets/ORG/NAME@COMMIT[/PREFIX])."""
        prefix = self.root.split("/", 3)[3] if self.root.count("/") >= 3 else ""
        return f"{prefix}/{relpath}" if prefix else relpath

    def display(self, relpath: str = "") -> str:
        """A printable name of a file below the root."""
        base = self.url.rstrip("/")
        return f"{base}/{relpath}" if relpath else base


def is_url(text: str) -> bool:
    """Whether `text` names a remote location (a scheme other than file://)."""
    scheme = urlsplit(str(text)).scheme.lower()
    return "://" in str(text) and scheme not in ("", "file")


def _check_endpoint(allow_insecure: bool) -> None:
    """Refuse a plain-http S3 endpoint on another machine (credentials and data in clear text)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    parts = urlsplit(endpoint)
    if parts.scheme != "http" or allow_insecure:
        return
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise RemoteError(redact(f"AWS_ENDPOINT_URL {endpoint} is plain http:// to another machine: use https://, "
                                 "or pass --allow-insecure on a network you trust"))


def _filesystem(protocol: str, url: str):
    import fsspec

    try:
        return fsspec.filesystem(protocol, skip_instance_cache=True)
    except ImportError:
        raise RemoteError(f"{redact(url)}: reading {protocol}:// needs the {PACKAGES[protocol]} package; "
                          f"install it with `pip install {PACKAGES[protocol]}`") from None


def _open_hub(url: str, rest: str) -> Location:
    """hf://datasets/ORG/NAME[@REVISION][/PREFIX], pinned to a commit."""
    parts = rest.split("/")
    if len(parts) < 3 or parts[0] != "datasets" or not parts[1] or not parts[2]:
        raise RemoteError(f"{redact(url)}: a cache on the Hub is a dataset repository: hf://datasets/ORG/NAME[@REVISION]")
    name, _, revision = parts[2].partition("@")
    repo_id, prefix = f"{parts[1]}/{name}", "/".join(parts[3:]).strip("/")
    if prefix:
        confine(prefix, redact(url))
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        commit = HfApi().dataset_info(repo_id, revision=revision or None).sha
    except RepositoryNotFoundError:
        raise RemoteError(f"{redact(url)}: no dataset repository {repo_id} on the Hub (or it is private: "
                          f"{CREDENTIAL_HINTS['hf']})") from None
    except RevisionNotFoundError:
        raise RemoteError(f"{redact(url)}: no revision {revision!r} in {repo_id}; give a branch, tag or commit") from None
    except HfHubHTTPError as err:
        raise RemoteError(redact(f"{url}: the Hub refused the request ({err}); {CREDENTIAL_HINTS['hf']}")) from None
    root = f"datasets/{repo_id}@{quote(commit, safe='')}" + (f"/{prefix}" if prefix else "")
    return Location(redact(url), "hf", root, _filesystem("hf", url), revision=commit, repo_id=repo_id)


def open_location(url: str | Path, *, allow_insecure: bool = False) -> Location:
    """Parse a cache location and open its file system (no request is made except to pin a Hub revision)."""
    text = str(url)
    parts = urlsplit(text) if "://" in text else None
    if parts is None or parts.scheme.lower() == "file":
        local = Path(parts.path if parts else text).expanduser().resolve()
        return Location(str(local), "file", local.as_posix(), _filesystem("file", text))
    scheme = parts.scheme.lower()
    if "@" in parts.netloc and scheme != "hf":
        raise RemoteError(f"{redact(text)}: credentials in a URL end up in logs; remove them and "
                          f"{CREDENTIAL_HINTS.get(scheme, 'use the store’s own credential settings')}")
    if scheme == "http" and not allow_insecure:
        raise RemoteError(f"{redact(text)}: plain http:// can be read and altered in transit; use https://, or pass "
                          "--allow-insecure on a network you trust")
    if scheme == "hf":
        return _open_hub(text, text.split("://", 1)[1].strip("/"))
    if scheme in ("s3", "gs", "gcs"):
        if not parts.netloc:
            raise RemoteError(f"{redact(text)}: no bucket; write {scheme}://BUCKET/PREFIX")
        prefix = parts.path.strip("/")
        if prefix:
            confine(prefix, redact(text))
        if scheme == "s3":
            _check_endpoint(allow_insecure)
        protocol = "gs" if scheme == "gcs" else scheme
        root = f"{parts.netloc}/{prefix}" if prefix else parts.netloc
        return Location(redact(text), protocol, root, _filesystem(protocol, text))
    if scheme in ("http", "https"):
        return Location(redact(text), scheme, text.rstrip("/"), _filesystem(scheme, text))
    raise RemoteError(f"{redact(text)}: unknown location; use a folder, file://, s3://, gs:// or hf://datasets/ORG/NAME")


def bucket_missing(err: BaseException, loc: Location) -> bool:
    """Whether a store's not-found error says that the bucket itself does not exist (not an object in it)."""
    if not isinstance(err, FileNotFoundError):
        return False
    text, bucket = str(err), loc.root.split("/", 1)[0]
    if loc.protocol == "s3":
        return "NoSuchBucket" in text or "specified bucket does not exist" in text.lower()
    if loc.protocol == "gs":  # a 404 on the bucket's object listing, b/BUCKET/o (an object's path goes on: .../o/NAME)
        return re.search(rf"\bb/{re.escape(bucket)}/o(?![/\w])", text) is not None
    return False


def explain(err: BaseException, loc: Location, what: str) -> RemoteError:
    """A store's exception -> one redacted line naming the fix (missing credentials, no such bucket, denied)."""
    if isinstance(err, RemoteError):
        return err
    name = type(err).__name__
    hint = CREDENTIAL_HINTS.get(loc.protocol, "check the store's credentials")
    text = str(err)
    bucket = loc.root.split("/", 1)[0]
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "LocalTokenNotFoundError"):
        message = f"{loc.url}: no credentials found for {loc.protocol}://; {hint}"
    elif bucket_missing(err, loc):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        message = (f"{loc.url}: bucket {bucket!r} does not exist" + (f" at {endpoint}" if endpoint else "")
                   + "; check the bucket name (and AWS_ENDPOINT_URL for an S3-compatible store), or create the bucket")
    elif isinstance(err, PermissionError) or name in ("GatedRepoError", "HTTPUnauthorized"):
        message = f"{loc.url}: access denied while {what}; {hint}, with rights to this location"
    elif isinstance(err, FileNotFoundError):
        message = f"{loc.url}: {what}: not found ({text})"
    else:
        message = f"{loc.url}: {what} failed ({name}: {text.splitlines()[0] if text else ''}); check the location and {hint}"
    return RemoteError(redact(message))


def read_bytes(loc: Location, relpath: str) -> bytes:
    """One small file (a manifest, a card) from the location."""
    try:
        return loc.fs.cat_file(loc.path(relpath))
    except Exception as err:  # noqa: BLE001 - every store error becomes one line naming the fix
        raise explain(err, loc, f"reading {relpath}") from None


def read_if_present(loc: Location, relpath: str) -> bytes | None:
    """One small file, or None when the location has no such file (a missing bucket or credentials still raise)."""
    try:
        return loc.fs.cat_file(loc.path(relpath))
    except FileNotFoundError as err:
        if bucket_missing(err, loc):
            raise explain(err, loc, f"reading {relpath}") from None
        return None
    except Exception as err:  # noqa: BLE001
        raise explain(err, loc, f"reading {relpath}") from None


def layers_matching(loc: Location, *patterns: str) -> list[str]:
    """The layers whose manifests match `patterns` (globs relative to the root, each ending in the manifest's name),
    as confined relative prefixes: a listing is untrusted."""
    candidates = [path for pattern in patterns for path in _glob(loc, pattern)]
    return [confine(str(PurePosixPath(c).parent), loc.url) for c in candidates]


def check_bucket(loc: Location) -> None:
    """RemoteError naming the fix if the bucket does not exist or cannot be read: an empty listing says neither."""
    if loc.protocol in ("s3", "gs"):
        try:
            loc.fs.ls(loc.root.split("/", 1)[0], detail=False)
        except Exception as err:  # noqa: BLE001
            raise explain(err, loc, "listing the bucket") from None


def _glob(loc: Location, pattern: str) -> list[str]:
    """Paths matching `pattern` below the root, relative to it."""
    try:
        found = loc.fs.glob(loc.path(pattern))
    except Exception as err:  # noqa: BLE001
        raise explain(err, loc, "listing the cache") from None
    root = loc.fs._strip_protocol(loc.root).rstrip("/")
    return sorted(p[len(root) + 1:] for p in (loc.fs._strip_protocol(f) for f in found) if p.startswith(root + "/"))


def git_blob_sha1(path: Path) -> str:
    """Git's object id of a file (what the Hub reports for a file not stored in LFS)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
