"""Real peers for the integration tests: nbdkit and qemu-nbd on loopback, started and torn
down by fixtures (``--exit-with-parent`` where the server has it, so none outlives the run)."""

from __future__ import annotations

import ctypes
import json
import random
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, TypeVar

from lazyiscsi.source.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    QEMU_DIRTY_BITMAP,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Cmd,
    Info,
    Opt,
    Rep,
)

MiB = 1 << 20
T = TypeVar("T")
# Generous: the suite shares small machines with other work; a condition that holds arrives
# long before this, one that never will fails the test with `what` named.
WAIT_S = 60.0
POLL_S = 0.05


def wait_until(condition: Callable[[], T | None], what: str, seconds: float = WAIT_S,
               proc: subprocess.Popen[str] | subprocess.Popen[bytes] | None = None) -> T:
    """Return ``condition()``'s first truthy value; fail naming ``what`` after ``seconds``, or at
    once when ``proc`` exits first (its condition can no longer come)."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: {proc.args!r} exited with {proc.returncode} first")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:g} s")
        time.sleep(POLL_S)


class Lines:
    """A child's output read line by line in a thread, so that a test can wait for a line
    (an event, a progress line) while the child runs."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                self.lines.append(line)

    def since(self, start: int) -> list[str]:
        with self._lock:
            return self.lines[start:]

    def text(self) -> str:
        """Everything read so far, the rest once the child closed the stream."""
        self._thread.join(timeout=WAIT_S)
        return "".join(self.since(0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nbdkit:
    """One NBD server on 127.0.0.1:port, restartable on the same port. nbdkit by default;
    ``command`` replaces the program and its listening arguments (qemu-nbd)."""

    def __init__(self, args: list[str], port: int, command: list[str] | None = None) -> None:
        self.args, self.port = args, port
        self.command = command or ["nbdkit", "-f", "-r", "--exit-with-parent", "-i", "127.0.0.1",
                                   "-p", str(port)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nbdkit:
        self.proc = subprocess.Popen([*self.command, *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"


def wait_listening(port: int, proc: subprocess.Popen[bytes], seconds: float = WAIT_S) -> None:
    """Return once something accepts on 127.0.0.1:port; fail if ``proc`` dies first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        time.sleep(POLL_S)
    raise RuntimeError(f"{proc.args[0]} did not listen on {port}")


def make_image(path: Path, size: int, seed: int = 7) -> bytes:
    rnd = random.Random(seed)
    data = b"".join(rnd.randbytes(MiB) for _ in range(size // MiB))
    path.write_bytes(data)
    return data




#: qemu-storage-daemon, qemu-nbd and qemu-io start in well under a second; a loaded machine is slower
QEMU_START_S = WAIT_S
#: the bitmap name the dirty-bitmap peers use unless told otherwise
BITMAP = "lazyiscsi-mig"


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the test process dies (qemu-storage-daemon has no
    --exit-with-parent), so a crashed run leaves no daemon behind (prctl(2) PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class Qmp:
    """A minimal QMP client on a Unix socket (QEMU's docs/interop/qmp-spec): one command at a
    time, asynchronous events skipped."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes]) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        wait_until(lambda: sock.connect_ex(str(path)) == 0, f"QMP socket {path}", QEMU_START_S, proc)
        sock.settimeout(WAIT_S)
        self._sock, self._file = sock, sock.makefile("rw", encoding="utf-8")
        self._file.readline()  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: object) -> object:
        """Run ``command``; its ``return`` value, or AssertionError with QEMU's ``desc``."""
        self._file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self._file.flush()
        while True:
            line = self._file.readline()
            if not line:
                raise AssertionError(f"QMP {command}: the daemon closed the monitor")
            reply = json.loads(line)
            if "event" in reply:
                continue
            if "error" in reply:
                raise AssertionError(f"QMP {command}: {reply['error'].get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class DirtyBitmapSource:
    """The issue-11 source site in one process: a qemu-storage-daemon that owns ``image`` (raw
    or qcow2), tracks writes in an enabled dirty bitmap (QMP ``block-dirty-bitmap-add``), and
    serves two NBD exports of the same node on one Unix socket (or TCP ``port``):

    * ``vm_url`` (export ``vm``, writable): what the source VM uses as its disk;
    * ``lazy_url`` (export ``lazy``, writable but never written by lazyiscsi, ``bitmaps: [NAME]``):
      what lazyiscsi reads, with the meta context ``qemu:dirty-bitmap:NAME``. QEMU 7.2 refuses
      an enabled bitmap on a read-only export ("incompatible with readonly export").

    Start it with ``start_dirty_bitmap_source``; ``write`` dirties through the VM's export with
    qemu-io; ``qmp`` reaches the daemon's monitor (``block-export-del``, ``block-dirty-bitmap-clear``).
    """

    def __init__(self, image: Path, workdir: Path, *, bitmap: str = BITMAP, granularity: int = 65536,
                 fmt: str = "raw", port: int | None = None) -> None:
        self.image, self.bitmap, self.granularity, self.port = image, bitmap, granularity, port
        self.socket_path = workdir / "qsd-nbd.sock"
        qmp_path = workdir / "qsd-qmp.sock"
        node = "disk"
        blockdev = (f"driver=file,node-name={node},filename={image}" if fmt == "raw" else
                    f"driver={fmt},node-name={node},file.driver=file,file.filename={image}")
        addr = (f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}" if port is not None
                else f"addr.type=unix,addr.path={self.socket_path}")
        self.log_path = workdir / "qsd.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["qemu-storage-daemon", "--blockdev", blockdev, "--nbd-server", addr,
                 "--chardev", f"socket,id=qmp,path={qmp_path},server=on,wait=off",
                 "--monitor", "chardev=qmp"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            self.qmp = Qmp(qmp_path, self.proc)
            self.qmp.execute("block-dirty-bitmap-add", node=node, name=bitmap, granularity=granularity)
            self.qmp.execute("block-export-add", type="nbd", id="vm", name="vm", writable=True,
                             **{"node-name": node})
            self.qmp.execute("block-export-add", type="nbd", id="lazy", name="lazy", writable=True,
                             bitmaps=[bitmap], **{"node-name": node})
        except BaseException:
            self.stop()
            raise

    def url(self, export: str) -> str:
        if self.port is not None:
            return f"nbd://127.0.0.1:{self.port}/{export}"
        return f"nbd+unix:///{export}?socket={self.socket_path}"

    @property
    def vm_url(self) -> str:
        return self.url("vm")

    @property
    def lazy_url(self) -> str:
        return self.url("lazy")

    def write(self, offset: int, length: int, pattern: int = 0xAB) -> None:
        """Write ``length`` bytes of ``pattern`` at ``offset`` as the source VM would: through
        the ``vm`` export, so the daemon's bitmap marks the granules dirty."""
        qemu_io(self.vm_url, f"write -P {pattern:#x} {offset} {length}")

    def stop(self) -> None:
        if getattr(self, "qmp", None) is not None:
            self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_dirty_bitmap_source(image: Path, workdir: Path, **options: object) -> DirtyBitmapSource:
    """A qemu-storage-daemon source site with a dirty bitmap and two exports (``DirtyBitmapSource``;
    ``options``: bitmap, granularity, fmt, port). Call ``stop()`` when done (a fixture's teardown)."""
    return DirtyBitmapSource(image, workdir, **options)  # type: ignore[arg-type]


def qemu_io(url: str, command: str, fmt: str = "raw") -> str:
    """Run one qemu-io command on ``url`` (an NBD URL or an image path); its output."""
    r = subprocess.run(["qemu-io", "-f", fmt, "-c", command, url], capture_output=True, text=True,
                       timeout=QEMU_START_S, stdin=subprocess.DEVNULL)
    if r.returncode != 0 or "error" in r.stdout.lower():
        raise AssertionError(f"qemu-io {command!r} on {url}: {r.stdout.strip()} {r.stderr.strip()}")
    return r.stdout


def make_qcow2_with_bitmap(path: Path, size: int, bitmap: str = BITMAP, granularity: int = 65536) -> Path:
    """A qcow2 image with a persistent, enabled dirty bitmap (``qemu-img bitmap --add``): every
    write made through QEMU from now on (qemu-io on the file, ``qemu-nbd -B``) is recorded in it."""
    for cmd in (["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                ["qemu-img", "bitmap", "--add", "-g", str(granularity), str(path), bitmap]):
        subprocess.run(cmd, check=True, capture_output=True, timeout=QEMU_START_S, stdin=subprocess.DEVNULL)
    return path


def qemu_nbd_with_bitmap(image: Path, port: int, bitmap: str = BITMAP, export: str = "disk") -> Nbdkit:
    """qemu-nbd serving a qcow2 ``image`` writable (so an enabled bitmap may be exported: QEMU
    refuses it on a read-only export) with ``-B bitmap``, several clients at once (our
    foreground and background connections, plus qemu-io writing). ``start()`` it; its URL is
    ``url + export``."""
    return Nbdkit(["-f", "qcow2", "-t", "--shared=8", "-B", bitmap, "-x", export, str(image)], port,
                  command=["qemu-nbd", "-b", "127.0.0.1", "-p", str(port)])


class ScriptedNbd:
    """A tiny NBD server in a thread, written from the NBD document: fixed newstyle, structured
    replies, the contexts in ``contexts`` (name -> id) when asked for, reads answered with
    zeros, and every NBD_CMD_BLOCK_STATUS answered with the chunk payloads ``answer(offset,
    length)`` returns (context id and descriptors, as bytes), then NBD_REPLY_TYPE_NONE."""

    def __init__(self, answer: Callable[[int, int], list[bytes]], size: int = 1 << 30,
                 contexts: dict[str, int] | None = None) -> None:
        self.answer, self.size = answer, size
        self.contexts = {BASE_ALLOCATION: 1, QEMU_DIRTY_BITMAP + BITMAP: 2} if contexts is None else contexts
        self.status_requests = 0
        self.reads = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/x"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, suppress(OSError, ConnectionError):
            f = conn.makefile("rb")
            conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
            f.read(4)
            while True:  # option haggling
                _, opt, length = struct.unpack(">QII", f.read(16))
                data = f.read(length)
                if opt == Opt.SET_META_CONTEXT:
                    (n,) = struct.unpack_from(">I", data)
                    pos = 4 + n
                    (count,) = struct.unpack_from(">I", data, pos)
                    pos += 4
                    for _ in range(count):
                        (qlen,) = struct.unpack_from(">I", data, pos)
                        query = data[pos + 4:pos + 4 + qlen].decode()
                        pos += 4 + qlen
                        if query in self.contexts:
                            self._opt_reply(conn, opt, Rep.META_CONTEXT,
                                            struct.pack(">I", self.contexts[query]) + query.encode())
                if opt == Opt.GO:
                    self._opt_reply(conn, opt, Rep.INFO, struct.pack(">HQH", Info.EXPORT, self.size, 3))
                    self._opt_reply(conn, opt, Rep.ACK)
                    break
                self._opt_reply(conn, opt, Rep.ACK if opt in (Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT)
                                else Rep.ERR_UNSUP)
            while True:  # transmission
                _, _, cmd, cookie, offset, length = struct.unpack(">IHHQQI", f.read(28))
                if cmd == Cmd.READ:
                    self.reads += 1
                    data = struct.pack(">Q", offset) + bytes(length)
                    self._chunk(conn, cookie, Chunk.OFFSET_DATA, data, True)
                elif cmd == Cmd.BLOCK_STATUS:
                    self.status_requests += 1
                    for payload in self.answer(offset, length):
                        self._chunk(conn, cookie, Chunk.BLOCK_STATUS, payload, False)
                    self._chunk(conn, cookie, Chunk.NONE, b"", True)
                else:
                    return

    @staticmethod
    def _opt_reply(conn: socket.socket, opt: int, rep: int, payload: bytes = b"") -> None:
        conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rep, len(payload)) + payload)

    @staticmethod
    def _chunk(conn: socket.socket, cookie: int, kind: int, payload: bytes, done: bool) -> None:
        conn.sendall(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, int(done), kind, cookie, len(payload)))
        conn.sendall(payload)  # not joined: a large payload is not copied
