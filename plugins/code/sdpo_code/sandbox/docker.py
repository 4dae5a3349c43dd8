"""The ``docker`` backend: one throw-away container per solution, on a local or remote engine.

Why: scale-out (a fleet of Docker hosts behind ``DOCKER_HOST``) and the strongest isolation short of a VM
that needs nothing on the trainer's machine but a socket.

What it isolates: the container's own namespaces; ``network_mode="none"``; a read-only root file system with
a size-capped tmpfs /tmp as the work dir; user 65534; all capabilities dropped; ``no-new-privileges``; a
memory cap (``memory_bytes`` + 256 MiB for the interpreter) with swap off; a PIDs cap; one CPU; plus the
harness's rlimits. The harness supervisor is the container's PID 1, so nothing outlives it, and the container
is force-removed afterwards. Not isolated: the engine's kernel (shared with its other containers).

The image needs ``python`` (3.10+) in /usr/bin or /bin; the default is the one ``sdpo sandbox build-image``
builds from this machine's interpreter (`sdpo_code.sandbox.docker_image`), which needs no registry. Verdicts
are the same as the other backends': the same harness runs, only the launcher differs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from typing import Any

from sdpo_code.sandbox._driver import drive
from sdpo_code.sandbox._system import HARNESS_FLAGS
from sdpo_code.sandbox.base import HARNESS_SOURCE, ExecutionRequest, ExecutionResult, SandboxUnavailable
from sdpo_code.sandbox.docker_image import DEFAULT_TAG

logger = logging.getLogger(__name__)


class _Demux:
    """Splits Docker's multiplexed attach stream (8-byte headers) and keeps stdout only."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def __call__(self, chunk: bytes) -> bytes:
        self.buf += chunk
        out = bytearray()
        while len(self.buf) >= 8:
            stream, size = self.buf[0], struct.unpack(">I", bytes(self.buf[4:8]))[0]
            if len(self.buf) < 8 + size:
                break
            if stream == 1:
                out += self.buf[8 : 8 + size]
            del self.buf[: 8 + size]
        return bytes(out)


class DockerSandbox:
    """Runs each solution in a fresh container; see the module docstring.

    Args:
        image (`str`, *optional*, defaults to `DEFAULT_TAG`): image with a `python` 3.10+ (the default is built
            by ``sdpo sandbox build-image``).
        base_url (`str`, *optional*): engine address; defaults to the environment (`DOCKER_HOST`, the local
            socket).
        pull (`bool`, *optional*, defaults to `True`): pull the image when the engine does not have it.
        tmpfs_mb (`int`, *optional*, defaults to 64): size of the writable /tmp.
        cpus (`float`, *optional*, defaults to 1.0): CPU quota per container.
    """

    name = "docker"
    isolates = ("the container's namespaces, no network", "a read-only root, a size-capped tmpfs /tmp",
                "user 65534, no capabilities, no-new-privileges", "memory, PIDs and CPU caps, plus the rlimits",
                "a new container per solution, force-removed")
    not_isolated = ("the engine's kernel (shared with its other containers)",)

    def __init__(
        self,
        *,
        image: str = DEFAULT_TAG,
        base_url: str | None = None,
        pull: bool = True,
        tmpfs_mb: int = 64,
        cpus: float = 1.0,
    ) -> None:
        try:
            import docker
        except ImportError as exc:  # pragma: no cover - docker is a core dependency
            raise SandboxUnavailable("docker backend: the 'docker' package is not installed") from exc
        where = base_url or os.environ.get("DOCKER_HOST") or "the local socket"
        try:
            self.client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
            self.client.ping()
        except Exception as exc:
            raise SandboxUnavailable(f"docker backend: no Docker engine answers at {where}: {exc}") from exc
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            if image == DEFAULT_TAG:
                raise SandboxUnavailable(f"docker backend: image {image!r} is not on the engine at {where}; build "
                                         "it with `sdpo sandbox build-image`") from None
            if not pull:
                raise SandboxUnavailable(
                    f"docker backend: image {image!r} is not on the engine and pull=False") from None
            logger.info("sdpo-code: pulling %s", image)
            try:
                self.client.images.pull(image)
            except Exception as exc:
                raise SandboxUnavailable(f"docker backend: cannot pull {image!r}: {exc}") from exc
        self.image = image
        self.tmpfs_mb = tmpfs_mb
        self.cpus = cpus
        self.isolation = (f"docker ({where}, image {image}): container namespaces, no network, read-only root, "
                          f"{tmpfs_mb} MiB tmpfs, uid 65534, no capabilities, memory and PIDs caps")

    def __repr__(self) -> str:
        return f"DockerSandbox(image={self.image!r})"

    def run(self, request: ExecutionRequest) -> ExecutionResult:
        api = self.client.api
        payload = request.payload()
        host_config = api.create_host_config(
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"size={self.tmpfs_mb}m,mode=1777"},
            mem_limit=request.limits.memory_bytes + (256 << 20),
            memswap_limit=request.limits.memory_bytes + (256 << 20),
            pids_limit=request.limits.nproc + 8,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            nano_cpus=int(self.cpus * 1e9),
        )
        try:
            container = api.create_container(
                self.image, command=["python", *HARNESS_FLAGS, "-c", HARNESS_SOURCE], stdin_open=True, tty=False,
                user="65534:65534", network_disabled=True, working_dir="/tmp", host_config=host_config,
                environment={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
                             "PYTHONHASHSEED": "0"},
                labels={"sdpo-code": "sandbox"},
            )
        except Exception as exc:
            return ExecutionResult(ready=False, harness_error=f"docker: could not create a container: {exc}")
        cid = container["Id"]
        try:
            return self._attach_and_drive(api, cid, request, payload)
        except Exception as exc:
            return ExecutionResult(ready=False, harness_error=f"docker: {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                api.remove_container(cid, force=True)

    def _attach_and_drive(self, api: Any, cid: str, request: ExecutionRequest, payload: bytes) -> ExecutionResult:
        attached = api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 0, "stream": 1})
        raw: socket.socket = getattr(attached, "_sock", attached)
        api.start(cid)
        read_fd, write_fd = os.pipe()
        demux = _Demux()

        def pump() -> None:  # socket (maybe TLS) -> pipe, so the driver can select on a plain fd
            try:
                while True:
                    chunk = raw.recv(1 << 16)
                    if not chunk:
                        break
                    data = demux(chunk)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(write_fd, view) :]
            except OSError:
                pass
            finally:
                os.close(write_fd)

        pumper = threading.Thread(target=pump, name="sdpo-code-docker", daemon=True)
        pumper.start()

        def kill() -> None:
            with contextlib.suppress(Exception):
                api.kill(cid)

        def finished() -> bool:
            try:
                return not api.inspect_container(cid)["State"]["Running"]
            except Exception:
                return True

        try:
            return drive(request, payload, raw.sendall, read_fd, kill, finished)
        finally:
            kill()
            with contextlib.suppress(OSError):
                raw.close()
            pumper.join(timeout=5)
            os.close(read_fd)
