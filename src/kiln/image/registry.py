"""An OCI distribution client: push images from the store to a registry and pull them back.

A registry is untrusted. Every pulled blob lands in a temp file while it is
hashed, and only reaches the store once its size and digest match the
descriptor; all blobs of an image are checked before any is published, so a
refused pull leaves the store as it was. Sizes are bounded before a byte is
read (a manifest is at most :data:`MAX_MANIFEST_BYTES`, a blob never longer
than its descriptor says). Layers are not unpacked here: they go through the
one safe extractor of :mod:`kiln.image.unpack` like every other layer.

Credentials come from a file (``USER:PASSWORD`` on one line, or Docker's
``config.json``), never from argv; plain HTTP is only allowed to loopback.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import ipaddress
import json
import os
import re
import ssl
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

from kiln.errors import KilnError
from kiln.image.digest import (
    DOCKER_MEDIA_TYPE_MANIFEST,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    is_digest,
)
from kiln.image.store import ImageStore, split_ref_name

if TYPE_CHECKING:
    import httpx

    from kiln.spec.models import Spec

MAX_MANIFEST_BYTES = 4 << 20
"""What distribution itself accepts; anything larger is hostile."""
MAX_BLOB_BYTES = 64 << 30
MAX_LAYERS = 1000
"""Far beyond what an overlay mount stacks (Docker stops at 128); more is a hostile
manifest making the pull fetch and store blob after blob."""
MAX_AUTH_FILE_BYTES = 1 << 20
MAX_CA_FILE_BYTES = 16 << 20
"""A system CA bundle is ~200 KiB; a bigger file is a wrong path."""
DEFAULT_CHUNK_BYTES = 8 << 20
DOCKER_MEDIA_TYPE_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_SCHEMA1_TYPES = {
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
}
_IMAGE_TYPES = {MEDIA_TYPE_MANIFEST, DOCKER_MEDIA_TYPE_MANIFEST}
_INDEX_TYPES = {MEDIA_TYPE_INDEX, DOCKER_MEDIA_TYPE_LIST}
_ACCEPT = ", ".join([MEDIA_TYPE_MANIFEST, DOCKER_MEDIA_TYPE_MANIFEST, *sorted(_INDEX_TYPES)])
_READ = 1 << 20
_SMALL_BODY = 64 << 10
_RESUME_ATTEMPTS = 3
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_REPO_RE = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class RegistryRef:
    """``HOST[:PORT]/REPO[:TAG|@sha256:…]`` taken apart."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def hostname(self) -> str:
        host = self.host
        if host.startswith("["):
            return host[1 : host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    def __str__(self) -> str:
        suffix = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"{self.host}/{self.repository}{suffix}"


def parse_ref(text: str) -> RegistryRef:
    """Refuse anything but ``HOST[:PORT]/REPO[:TAG|@sha256:…]``; the host is never implied."""
    text = text.strip().removeprefix("registry:").removeprefix("docker://")
    usage = f"bad registry reference {text!r}: expected HOST[:PORT]/REPO[:TAG|@sha256:…]"
    host, slash, rest = text.partition("/")
    if not slash or not rest or not _HOST_RE.match(host):
        raise KilnError(usage)
    digest: str | None = None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not is_digest(digest):
            raise KilnError(f"{usage} (the digest must be sha256:<64 hex digits>)")
    tag: str | None = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, _, tag = rest.rpartition(":")
        if not _TAG_RE.match(tag):
            raise KilnError(f"{usage} (bad tag {tag!r})")
    if not _REPO_RE.match(rest):
        raise KilnError(f"{usage} (bad repository {rest!r}: lowercase [a-z0-9._-/])")
    return RegistryRef(host, rest, tag, digest)


def is_loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


# -- credentials -------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str
    """Where they came from, for the error a 401 prints."""


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    return Path(base) / "config.json"


def load_credentials(host: str, auth_file: Path | None) -> Credentials | None:
    """Credentials for ``host`` from ``auth_file``, else from Docker's ``config.json`` if any.

    ``auth_file`` is either Docker's format (``{"auths": {HOST: {"auth": base64(U:P)}}}``)
    or one line ``USER:PASSWORD``.
    """
    if auth_file is None:
        path = docker_config_path()
        if not path.is_file():
            return None
        return _from_docker_config(path, host, required=False)
    try:
        text = read_small_file(auth_file, MAX_AUTH_FILE_BYTES).decode()
    except (OSError, UnicodeDecodeError) as e:
        raise KilnError(f"cannot read credentials from {auth_file}: {e}") from None
    if text.lstrip().startswith("{"):
        return _from_docker_config(auth_file, host, required=True)
    line = text.strip().splitlines()[0] if text.strip() else ""
    user, sep, password = line.partition(":")
    if not sep or not user:
        raise KilnError(f"credentials file {auth_file}: expected one line USER:PASSWORD")
    return Credentials(user, password, str(auth_file))


def read_small_file(path: Path, limit: int) -> bytes:
    """A regular file of at most ``limit`` bytes: a FIFO would block the read forever and
    /dev/zero or a huge file would fill memory. Opened without blocking, then checked."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return data


def _from_docker_config(path: Path, host: str, *, required: bool) -> Credentials | None:
    try:
        data = json.loads(read_small_file(path, MAX_AUTH_FILE_BYTES))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise KilnError(f"cannot read credentials from {path}: {e}") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        if required:
            raise KilnError(f'credentials file {path}: no "auths" object')
        return None
    for key, entry in auths.items():
        bare = str(key).removeprefix("https://").removeprefix("http://").split("/", 1)[0]
        if bare != host or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str):
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise KilnError(
                    f"credentials file {path}: auths.{key}.auth is not base64"
                ) from None
            user, sep, password = decoded.partition(":")
            if sep and user:
                return Credentials(user, password, str(path))
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"], str(path))
        raise KilnError(f"credentials file {path}: auths.{key} has no usable auth")
    if required:
        raise KilnError(f"credentials file {path} has no entry for {host}")
    return None


# -- the client --------------------------------------------------------------


@dataclass(frozen=True)
class RegistryOptions:
    ca_file: Path | None = None
    auth_file: Path | None = None
    plain_http: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    timeout: float = 60.0


@dataclass
class PushResult:
    ref: str
    digest: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    resumed: int = 0
    """Uploads continued from the offset the registry reported after a broken PATCH."""
    restarted: int = 0
    """Uploads begun again because the registry had dropped them."""
    referrers: list[str] = field(default_factory=list)
    """Artifact manifests (SBOM, provenance, signatures) uploaded with the image."""
    referrers_present: list[str] = field(default_factory=list)
    fallback_tags: list[str] = field(default_factory=list)
    """``sha256-<hex>`` referrers-tag indexes written (registries without the API)."""


@dataclass
class PullResult:
    ref: str
    local_ref: str
    digest: str
    fetched: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    fetched_bytes: int = 0
    referrers: list[str] = field(default_factory=list)
    """Artifact manifests fetched, verified and stored with the image."""
    referrers_present: list[str] = field(default_factory=list)
    referrers_refused: list[str] = field(default_factory=list)
    """One line per referrer (or listing) refused; none of it was stored."""


class RegistryClient:
    """One registry host: TLS (or loopback plain HTTP), Basic or Bearer auth, one-line errors."""

    def __init__(self, host: str, options: RegistryOptions) -> None:
        import httpx

        self.host = host
        self.options = options
        hostname = RegistryRef(host, "x").hostname
        if options.plain_http and not is_loopback(hostname):
            raise KilnError(
                f"--plain-http is only allowed for a registry on loopback; {host} is not "
                "(give its CA with --ca instead)"
            )
        self.base = f"{'http' if options.plain_http else 'https'}://{host}"
        self.credentials = load_credentials(host, options.auth_file)
        verify: ssl.SSLContext | bool = True
        if options.ca_file is not None:
            try:
                pem = read_small_file(options.ca_file, MAX_CA_FILE_BYTES).decode("ascii")
                verify = ssl.create_default_context(cadata=pem)
            except UnicodeDecodeError:
                raise KilnError(f"--ca {options.ca_file}: not a PEM file") from None
            except (OSError, ssl.SSLError) as e:
                raise KilnError(f"--ca {options.ca_file}: cannot load it: {e}") from None
        self._http = httpx.Client(verify=verify, timeout=options.timeout, trust_env=False)
        self._auth_header: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        """Every request sent (method, path): what the tests count."""

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------

    def url(self, path_or_url: str) -> str:
        return urljoin(self.base + "/", path_or_url)

    def send(
        self,
        method: str,
        path_or_url: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        stream: bool = False,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """One request, answering one auth challenge; 401 after that is the user's error."""
        import httpx

        url = self.url(path_or_url)
        for attempt in range(2):
            # Credentials go to this registry only: an upload Location on another host
            # (a hostile or confused registry) gets the request without them.
            auth = self._auth_header if self._same_origin(url) else {}
            request = self._http.build_request(
                method, url, headers={**(headers or {}), **auth}, content=content
            )
            self.requests.append((method, request.url.path))
            try:
                response = self._http.send(request, stream=True, follow_redirects=follow_redirects)
            except httpx.TransportError as e:
                raise self._transport_error(e) from None
            if response.status_code == 401 and attempt == 0:
                challenge = response.headers.get("WWW-Authenticate", "")
                response.close()
                self._answer_challenge(challenge, scope)
                continue
            if stream:
                return response
            return self._bounded_copy(response)
        raise AssertionError("unreachable")

    def _same_origin(self, url: str) -> bool:
        import httpx

        ours, theirs = httpx.URL(self.base), httpx.URL(url)
        return (ours.scheme, ours.host, ours.port) == (theirs.scheme, theirs.host, theirs.port)

    def _bounded_copy(self, response: httpx.Response) -> httpx.Response:
        """The response with at most 64 KiB of its body read: answers we only need headers of."""
        import httpx

        data = b""
        try:
            for chunk in response.iter_raw(_READ):
                data += chunk
                if len(data) > _SMALL_BODY:
                    data = data[:_SMALL_BODY]
                    break
        except httpx.TransportError as e:
            raise self._transport_error(e) from None
        finally:
            response.close()
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            content=data,
            request=response.request,
        )

    def _transport_error(self, error: Exception) -> KilnError:
        text = str(error) or type(error).__name__
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            hint = f"--ca {self.options.ca_file}" if self.options.ca_file else "no --ca given"
            return KilnError(f"TLS to {self.host} failed: certificate not trusted ({hint})")
        if "SSL" in text or "TLS" in text:
            return KilnError(f"TLS to {self.host} failed: {text}")
        return KilnError(f"cannot talk to registry {self.host}: {text}")

    def _cred_source(self) -> str:
        return (
            f"credentials from {self.credentials.source}"
            if self.credentials
            else ("no credentials found; give --auth-file")
        )

    def _unauthorized(self) -> KilnError:
        return KilnError(f"unauthorized at {self.host} ({self._cred_source()})")

    def _answer_challenge(self, challenge: str, scope: str) -> None:
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic":
            if self.credentials is None:
                raise self._unauthorized()
            pair = f"{self.credentials.username}:{self.credentials.password}".encode()
            self._auth_header = {"Authorization": "Basic " + base64.b64encode(pair).decode()}
            return
        if scheme == "bearer":
            self._auth_header = {"Authorization": "Bearer " + self._fetch_token(challenge, scope)}
            return
        raise self._unauthorized()

    def _fetch_token(self, challenge: str, scope: str) -> str:
        import httpx

        params = dict(_CHALLENGE_PARAM_RE.findall(challenge))
        realm = params.get("realm", "")
        realm_url = httpx.URL(realm) if realm else None
        if realm_url is None or realm_url.scheme not in ("https", "http"):
            raise KilnError(f"registry {self.host} asked for a token without a usable realm")
        if realm_url.scheme == "http" and not is_loopback(realm_url.host):
            raise KilnError(
                f"registry {self.host} sends credentials to a plain-HTTP token realm {realm}; "
                "refused"
            )
        query: list[tuple[str, str | int | float | bool | None]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        scopes = [s for s in (params.get("scope") or scope).split(" ") if s]
        for item in scopes or [scope]:
            query.append(("scope", item))
        auth = None
        if self.credentials is not None:
            auth = (self.credentials.username, self.credentials.password)
        self.requests.append(("GET", realm_url.path))
        request = self._http.build_request("GET", realm_url, params=query)
        if auth is not None:
            pair = f"{auth[0]}:{auth[1]}".encode()
            request.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        try:
            response = self._bounded_copy(self._http.send(request, stream=True))
        except httpx.TransportError as e:
            raise self._transport_error(e) from None
        if response.status_code in (401, 403):
            raise self._unauthorized()
        if response.status_code != 200:
            raise KilnError(f"token service {realm} answered {response.status_code}")
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise KilnError(f"token service {realm} answered without a token")
        return token

    def check(self, response: httpx.Response, what: str, *expected: int) -> httpx.Response:
        """Turn any unexpected status into one line naming what failed."""
        status = response.status_code
        if status in expected:
            return response
        if not response.is_stream_consumed:
            response = self._bounded_copy(response)
        if status == 401:
            raise self._unauthorized()
        if status == 403:
            raise KilnError(f"denied at {self.host}: {what} ({self._cred_source()})")
        if status == 404:
            raise KilnError(f"{what}: not found at {self.host}")
        detail = _error_detail(response)
        if status == 413:
            raise KilnError(
                f"registry {self.host} refused {what} as too large (413){detail}: raise its "
                "upload limit (a proxy's body size, the registry's own), or make the image smaller"
            )
        if status >= 500:
            raise KilnError(f"registry {self.host} failed ({status}) on {what}{detail}")
        raise KilnError(f"registry {self.host} answered {status} on {what}{detail}")


def _error_detail(response: httpx.Response) -> str:
    """The registry's first error message, if its body was read and says one."""
    import httpx

    try:
        errors = json.loads(response.content[:4096]).get("errors") or []
        message = str(errors[0].get("message", "")) if errors else ""
    except (httpx.ResponseNotRead, ValueError, UnicodeDecodeError, AttributeError, TypeError):
        return ""
    return f": {message[:200]}" if message else ""


def options_for(spec: Spec, host: str) -> RegistryOptions:
    """What ``[registries."HOST"]`` of ``kiln.toml`` says about ``host`` (its paths are
    relative to the file); no table: the defaults (system CAs, Docker's config)."""
    access = spec.registries.get(host)
    if access is None:
        return RegistryOptions()
    where = f'{spec.path.name}: registries."{host}"'

    def existing(key: str, value: str | None) -> Path | None:
        if value is None:
            return None
        path = spec.root / value
        if not path.is_file():
            raise KilnError(f"{where}.{key}: {path} is not a file")
        return path

    return RegistryOptions(
        ca_file=existing("ca", access.ca),
        auth_file=existing("auth_file", access.auth_file),
        plain_http=access.plain_http,
    )


# -- push --------------------------------------------------------------------


def push(
    store: ImageStore,
    ref: str,
    dest: str,
    options: RegistryOptions | None = None,
    *,
    mount_from: str | None = None,
    client: RegistryClient | None = None,
    referrers: bool = False,
) -> PushResult:
    """Upload an image's blobs the registry lacks, then its manifest; returns what moved.

    With ``referrers`` its evidence follows, by :mod:`kiln.image.referrer_transfer`.
    """
    options = options or RegistryOptions()
    target = parse_ref(dest)
    entry = store.resolve(ref)
    if entry.media_type in _INDEX_TYPES:
        raise KilnError(f"{ref} is an image index; push one of its manifests")
    manifest_bytes = store.read_bytes(entry.digest)
    if target.digest and target.digest != entry.digest:
        raise KilnError(f"{dest} names {target.digest} but {ref} is {entry.digest}")
    try:
        manifest = json.loads(manifest_bytes)
        blobs = [Descriptor.from_json(manifest["config"])]
        blobs += [Descriptor.from_json(layer) for layer in manifest.get("layers", [])]
    except (ValueError, KeyError, TypeError) as e:
        raise KilnError(f"manifest {entry.digest} of {ref} is malformed: {e}") from None
    media_type = str(manifest.get("mediaType") or entry.media_type or MEDIA_TYPE_MANIFEST)
    result = PushResult(str(target), entry.digest)
    own = client or RegistryClient(target.host, options)
    try:
        scope = f"repository:{target.repository}:pull,push"
        if mount_from:
            scope += f" repository:{mount_from}:pull"
        for blob in blobs:
            _push_blob(own, store, target.repository, blob, scope, mount_from, result)
        response = own.send(
            "PUT",
            f"/v2/{target.repository}/manifests/{target.reference}",
            scope=scope,
            headers={"Content-Type": media_type},
            content=manifest_bytes,
        )
        own.check(response, f"manifest upload to {target}", 201, 200)
        answered = response.headers.get("Docker-Content-Digest")
        if answered and answered != entry.digest:
            raise KilnError(
                f"registry {target.host} stored the manifest as {answered}, not {entry.digest}"
            )
        if referrers:
            from kiln.image.referrer_transfer import push_referrers

            push_referrers(own, store, target.repository, entry.digest, scope, result)
    finally:
        if client is None:
            own.close()
    return result


def _push_blob(
    client: RegistryClient,
    store: ImageStore,
    repository: str,
    blob: Descriptor,
    scope: str,
    mount_from: str | None,
    result: PushResult,
) -> None:
    what = f"blob {blob.digest[:19]}… of {repository}"
    head = client.send("HEAD", f"/v2/{repository}/blobs/{blob.digest}", scope=scope)
    if head.status_code == 200:
        result.skipped.append(blob.digest)
        return
    client.check(head, what, 404)
    uploads = f"/v2/{repository}/blobs/uploads/"
    if mount_from:
        response = client.send(
            "POST", f"{uploads}?mount={blob.digest}&from={mount_from}", scope=scope
        )
        client.check(response, f"mount of {what} from {mount_from}", 201, 202)
        if response.status_code == 201:
            result.mounted.append(blob.digest)
            return
    else:
        response = client.check(client.send("POST", uploads, scope=scope), what, 202)
    location = _location(response, what)
    location = _upload_chunks(client, store, blob, (uploads, location), scope, what, result)
    separator = "&" if "?" in location else "?"
    done = client.send("PUT", f"{location}{separator}digest={blob.digest}", scope=scope)
    client.check(done, f"upload of {what}", 201, 204)
    result.uploaded.append(blob.digest)
    result.uploaded_bytes += blob.size


def _location(response: httpx.Response, what: str) -> str:
    location = response.headers.get("Location")
    if not location:
        raise KilnError(f"registry answered the upload of {what} without a Location")
    return str(response.url.join(location))


def _upload_chunks(
    client: RegistryClient,
    store: ImageStore,
    blob: Descriptor,
    session: tuple[str, str],
    scope: str,
    what: str,
    result: PushResult,
) -> str:
    """PATCH the blob in chunks; after a broken PATCH ask the upload where it stands.

    A registry that forgot the upload (distribution cancels one whose state token
    lags behind what it received) gets a new one, started from byte 0.
    """
    uploads, location = session
    offset = 0
    failures = 0
    with store.open_blob(blob.digest) as source:
        while offset < blob.size:
            source.seek(offset)
            chunk = source.read(client.options.chunk_bytes)
            if not chunk:
                raise KilnError(f"{what} in {store.root} is shorter than its descriptor")
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            }
            try:
                response = client.send(
                    "PATCH", location, scope=scope, headers=headers, content=chunk
                )
                if response.status_code >= 500:
                    raise KilnError(f"registry {client.host} failed ({response.status_code})")
                client.check(response, f"upload of {what}", 202, 204)
            except KilnError as error:
                failures += 1
                if failures > _RESUME_ATTEMPTS:
                    raise KilnError(f"upload of {what} failed {failures} times: {error}") from None
                status = client.send("GET", location, scope=scope)
                if status.status_code == 404:
                    fresh = client.check(client.send("POST", uploads, scope=scope), what, 202)
                    location, offset = _location(fresh, what), 0
                    result.restarted += 1
                    continue
                client.check(status, f"status of {what}", 204)
                location, offset = _location(status, what), _range_end(status, 0)
                result.resumed += 1
                continue
            location = _location(response, what)
            offset = _range_end(response, offset + len(chunk))
    return location


def _range_end(response: httpx.Response, default: int) -> int:
    """``Range: 0-N`` → N+1 bytes received; a missing header trusts ``default``."""
    value = response.headers.get("Range", "")
    match = re.fullmatch(r"(?:bytes=)?0-(\d+)", value.strip())
    if not match:
        return default
    end = int(match.group(1)) + 1
    return 0 if end == 1 and default == 0 else end


# -- pull --------------------------------------------------------------------


LayerCheck = Callable[[Descriptor, Path], None]
"""Called with each fetched layer's descriptor and verified temp file before anything is
stored; raising refuses the whole pull."""


def resolve(src: str, options: RegistryOptions | None = None) -> str:
    """The digest of the manifest (or index) ``src`` names now: what a tag is pinned to."""
    source = parse_ref(src)
    with RegistryClient(source.host, options or RegistryOptions()) as client:
        scope = f"repository:{source.repository}:pull"
        data, media_type, digest = _fetch_manifest(client, source, source.reference, scope)
    _decode_manifest(data, media_type, source)
    return digest


def pull(
    store: ImageStore,
    src: str,
    options: RegistryOptions | None = None,
    *,
    local_name: str | None = None,
    client: RegistryClient | None = None,
    check_layer: LayerCheck | None = None,
    referrers: bool = False,
    warn: Callable[[str], None] | None = None,
) -> PullResult:
    """Fetch an image, verify every blob, then publish blobs, manifest and tag in that order.

    With ``referrers`` its evidence follows once the image is stored; a referrer refused
    goes to ``warn`` (one line) and into the result, and is not stored.
    """
    options = options or RegistryOptions()
    source = parse_ref(src)
    own = client or RegistryClient(source.host, options)
    temps: list[Path] = []
    try:
        scope = f"repository:{source.repository}:pull"
        manifest_bytes, media_type, digest = _fetch_manifest(own, source, source.reference, scope)
        manifest = _decode_manifest(manifest_bytes, media_type, source)
        if media_type in _INDEX_TYPES:
            child = _pick_platform(manifest, source)
            manifest_bytes, media_type, digest = _fetch_manifest(own, source, child.digest, scope)
            manifest = _decode_manifest(manifest_bytes, media_type, source)
            if media_type not in _IMAGE_TYPES:
                raise KilnError(f"{source}: the index points at another index; refused")
        local_ref = local_name or local_ref_name(source, digest)
        split_ref_name(local_ref)
        result = PullResult(str(source), local_ref, digest)
        layers = manifest.get("layers") or []
        if isinstance(layers, list) and len(layers) > MAX_LAYERS:
            raise KilnError(f"{source} has {len(layers)} layers; refused (limit {MAX_LAYERS})")
        try:
            blobs = [Descriptor.from_json(manifest["config"])]
            blobs += [Descriptor.from_json(layer) for layer in layers]
        except (KeyError, TypeError) as e:
            raise KilnError(f"manifest of {source} is malformed: {e}") from None
        verified: list[tuple[Path, Descriptor]] = []
        for blob in blobs:
            if store.has(blob.digest) or any(d.digest == blob.digest for _, d in verified):
                result.present.append(blob.digest)
                continue
            out, tmp = store.temp_file(suffix=".pull")
            temps.append(tmp)
            with out:
                _fetch_blob(own, source, blob, out, scope)
            verified.append((tmp, blob))
            result.fetched.append(blob.digest)
            result.fetched_bytes += blob.size
        if check_layer is not None:
            for tmp, blob in verified:
                if blob.digest != blobs[0].digest:
                    check_layer(blob, tmp)
        for tmp, blob in verified:
            stored = store.put_file(tmp, blob.media_type, move=True)
            if stored.digest != blob.digest:
                raise KilnError(f"blob {blob.digest} changed on disk while it was stored")
        stored_manifest = store.put_bytes(manifest_bytes, media_type)
        store.tag(local_ref, stored_manifest)
        if referrers:
            from kiln.image.referrer_transfer import pull_referrers

            pull_referrers(own, store, source, digest, scope, result, warn or (lambda _: None))
        return result
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if client is None:
            own.close()


def local_ref_name(source: RegistryRef, digest: str) -> str:
    """The store tag of a pull: a pull by digest is tagged by (a prefix of) that digest."""
    if source.digest:
        return f"{source.repository}:sha256-{digest.removeprefix('sha256:')[:16]}"
    return f"{source.repository}:{source.tag or 'latest'}"


def _fetch_manifest(
    client: RegistryClient, source: RegistryRef, reference: str, scope: str
) -> tuple[bytes, str, str]:
    what = (
        f"manifest {source.host}/{source.repository}@{reference}"
        if is_digest(reference)
        else (f"manifest {source.host}/{source.repository}:{reference}")
    )
    response = client.send(
        "GET",
        f"/v2/{source.repository}/manifests/{reference}",
        scope=scope,
        headers={"Accept": _ACCEPT},
        stream=True,
    )
    client.check(response, what, 200)
    try:
        declared = response.headers.get("Content-Length")
        if declared is not None and int(declared) > MAX_MANIFEST_BYTES:
            raise KilnError(
                f"{what} is {int(declared)} bytes; refused (limit {MAX_MANIFEST_BYTES})"
            )
        data = b"".join(_bounded(response, MAX_MANIFEST_BYTES, what))
    finally:
        response.close()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if is_digest(reference) and digest != reference:
        raise KilnError(f"{what} hashes to {digest}; refused")
    answered = response.headers.get("Docker-Content-Digest")
    if answered and answered != digest:
        raise KilnError(f"{what}: registry says {answered} but it hashes to {digest}; refused")
    media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
    return data, media_type, digest


def _bounded(response: httpx.Response, limit: int, what: str) -> Iterator[bytes]:
    import httpx

    total = 0
    try:
        for chunk in response.iter_bytes(_READ):
            total += len(chunk)
            if total > limit:
                raise KilnError(f"{what} is larger than {limit} bytes; refused")
            yield chunk
    except httpx.TransportError as e:
        raise KilnError(f"{what} is truncated: {e}") from None


def _decode_manifest(data: bytes, media_type: str, source: RegistryRef) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise KilnError(f"manifest of {source} is not JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise KilnError(f"manifest of {source} is not a JSON object")
    declared = str(manifest.get("mediaType") or media_type)
    if (
        media_type in _SCHEMA1_TYPES
        or declared in _SCHEMA1_TYPES
        or (manifest.get("schemaVersion") == 1)
    ):
        raise KilnError(f"{source} is a Docker schema1 manifest; refused (push it again as v2)")
    if manifest.get("schemaVersion") != 2:
        raise KilnError(f"manifest of {source} has schemaVersion {manifest.get('schemaVersion')}")
    kind = media_type if media_type in _IMAGE_TYPES | _INDEX_TYPES else declared
    if kind not in _IMAGE_TYPES | _INDEX_TYPES:
        if "manifests" in manifest:
            kind = MEDIA_TYPE_INDEX
        elif "config" in manifest:
            kind = MEDIA_TYPE_MANIFEST
        else:
            raise KilnError(f"manifest of {source} has unknown media type {kind!r}")
    manifest["mediaType"] = manifest.get("mediaType") or kind
    return manifest


def _pick_platform(index: dict[str, Any], source: RegistryRef) -> Descriptor:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    for item in index.get("manifests") or []:
        if not isinstance(item, dict):
            continue
        platform = item.get("platform") or {}
        if platform.get("os") == "linux" and platform.get("architecture") == arch:
            return Descriptor.from_json(item)
    raise KilnError(f"{source} has no image for linux/{arch}")


def _fetch_blob(
    client: RegistryClient,
    source: RegistryRef,
    blob: Descriptor,
    out: Any,
    scope: str,
) -> None:
    """Stream one blob into ``out`` while hashing; refuse it unless size and digest match."""
    what = f"blob {blob.digest[:19]}… of {source.host}/{source.repository}"
    if not 0 <= blob.size <= MAX_BLOB_BYTES:
        raise KilnError(f"{what}: descriptor size {blob.size} refused")
    response = client.send(
        "GET",
        f"/v2/{source.repository}/blobs/{blob.digest}",
        scope=scope,
        stream=True,
        follow_redirects=True,
    )
    client.check(response, what, 200)
    hasher = hashlib.sha256()
    received = 0
    try:
        declared = response.headers.get("Content-Length")
        if declared is not None and int(declared) > blob.size:
            raise KilnError(
                f"{what}: registry sends {int(declared)} bytes, descriptor says {blob.size}; "
                "refused"
            )
        for chunk in _bounded(response, blob.size, what):
            hasher.update(chunk)
            out.write(chunk)
            received += len(chunk)
    finally:
        response.close()
    if received != blob.size:
        raise KilnError(f"{what} is truncated: {received} of {blob.size} bytes; refused")
    digest = "sha256:" + hasher.hexdigest()
    if digest != blob.digest:
        raise KilnError(f"{what} hashes to {digest}; refused")
    out.flush()
    os.fsync(out.fileno())
