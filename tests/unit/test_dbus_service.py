"""The ``lazy`` handler's D-Bus side against a real dbus-daemon on a private socket, read with
dbus-send (what targetcli's GetManagedObjects and CheckConfig look like on the wire) and a
scripted tcmu-runner: owns ``org.kernel.TCMUService1`` with no flags (it queues behind us, as
tcmu-runner's ``g_bus_own_name(..., G_BUS_NAME_OWNER_FLAGS_NONE, ...)`` does) and answers
RegisterHandler on ``/org/kernel/TCMUService1/HandlerManager1``."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.subprocess
import pytest
import structlog
from jeepney import new_method_call, new_method_return
from jeepney.low_level import HeaderFields, Message

from lazyiscsi.dbus import bus as busmod
from lazyiscsi.dbus import tcmuservice
from lazyiscsi.dbus.bus import BUS, BusError, Connection
from lazyiscsi.dbus.tcmuservice import SERVICE, Role, TcmuService

pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="scripts/setup.sh installs dbus")

DESC = "lazy/<volume>: a volume of the lazyiscsi daemon"
WAIT = 30.0


def check(cfgstring: str) -> str | None:
    return None if cfgstring == "lazy/vm1" else f"no volume {cfgstring.removeprefix('lazy/')!r}"


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[str]:
    """A private dbus-daemon (the session configuration: anyone may own and call any name)."""
    address = f"unix:path={tmp_path / 'bus'}"
    proc = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address={address}",
                             "--print-address=1"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("unix:path=")
    yield address
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcmuservice, "QUEUE_POLL", 0.1)
    monkeypatch.setattr(tcmuservice, "RECONNECT", 0.2)


def wait_until(what: str, predicate) -> None:  # type: ignore[no-untyped-def]
    with gevent.Timeout(WAIT, AssertionError(f"timed out waiting for {what}")):
        while not predicate():
            gevent.sleep(0.02)


def dbus_send(address: str, dest: str, path: str, method: str,
              *args: str) -> subprocess.CompletedProcess[str]:
    return gevent.subprocess.run(["dbus-send", f"--bus={address}", "--print-reply", f"--dest={dest}", path,
                                  method, *args], capture_output=True, text=True, timeout=WAIT)


class FakeRunner:
    """tcmu-runner's D-Bus side: owns the service name (flags 0) and records RegisterHandler."""

    def __init__(self, address: str) -> None:
        self.registered: list[tuple[str, str]] = []
        self.conn = Connection(address, on_call=self._on_call, on_signal=lambda msg: None)
        self.conn.connect()
        (self.answer,) = self.conn.call(new_method_call(BUS, "RequestName", "su", (SERVICE, 0)),
                                        timeout=WAIT).body

    def owns(self) -> bool:
        owner = self.conn.call(new_method_call(BUS, "GetNameOwner", "s", (SERVICE,)), timeout=WAIT).body[0]
        return owner == self.conn.unique_name  # type: ignore[no-any-return]

    def _on_call(self, msg: Message) -> Message | None:
        if msg.header.fields.get(HeaderFields.member) == "RegisterHandler":
            self.registered.append(msg.body)
            return new_method_return(msg, "bs", (True, "succeeded"))
        return None


@pytest.fixture
def service(bus: str) -> Iterator[TcmuService]:
    runners: list[int] = []
    s = TcmuService("lazy", DESC, check, address=bus, on_runner=lambda: runners.append(1))
    s.runner_calls = runners  # type: ignore[attr-defined]
    yield s
    s.stop()


def test_without_tcmu_runner_targetcli_finds_user_lazy(bus: str, service: TcmuService) -> None:
    service.start()
    wait_until("the service name", lambda: service.role is Role.OWNER)
    r = dbus_send(bus, SERVICE, "/org/kernel/TCMUService1",
                  "org.freedesktop.DBus.ObjectManager.GetManagedObjects")
    assert r.returncode == 0, r.stderr
    assert 'object path "/org/kernel/TCMUService1/lazy"' in r.stdout
    assert 'string "org.kernel.TCMUService1"' in r.stdout and f'string "{DESC}"' in r.stdout
    r = dbus_send(bus, SERVICE, "/org/kernel/TCMUService1/lazy", "org.kernel.TCMUService1.CheckConfig",
                  "string:lazy/vm1")
    assert r.returncode == 0 and "boolean true" in r.stdout, r.stdout + r.stderr
    r = dbus_send(bus, SERVICE, "/org/kernel/TCMUService1/lazy", "org.kernel.TCMUService1.CheckConfig",
                  "string:lazy/nope")
    assert "boolean false" in r.stdout and "no volume 'nope'" in r.stdout, r.stdout
    r = dbus_send(bus, SERVICE, "/org/kernel/TCMUService1/lazy", "org.freedesktop.DBus.Properties.Get",
                  "string:org.kernel.TCMUService1", "string:ConfigDesc")
    assert DESC in r.stdout, r.stdout + r.stderr
    r = dbus_send(bus, SERVICE, "/org/kernel/TCMUService1/lazy", "org.kernel.TCMUService1.Nothing")
    assert r.returncode != 0 and "UnknownMethod" in r.stderr


def test_with_tcmu_runner_running_we_register_and_serve_check_config(bus: str, service: TcmuService) -> None:
    runner = FakeRunner(bus)
    assert runner.answer == tcmuservice.PRIMARY_OWNER
    service.start()
    wait_until("RegisterHandler", lambda: runner.registered)
    assert runner.registered == [("lazy", DESC)]
    wait_until("the registered role", lambda: service.role is Role.REGISTERED)
    assert service.runner_calls == [1]  # type: ignore[attr-defined]
    # what tcmu-runner forwards targetcli's CheckConfig to
    r = dbus_send(bus, "org.kernel.TCMUService1.HandlerManager1.lazy",
                  "/org/kernel/TCMUService1/HandlerManager1/lazy", "org.kernel.TCMUService1.CheckConfig",
                  "string:lazy/nope")
    assert "boolean false" in r.stdout and "no volume 'nope'" in r.stdout, r.stdout + r.stderr


def test_we_yield_the_service_to_tcmu_runner_and_take_it_back_when_it_exits(bus: str,
                                                                           service: TcmuService) -> None:
    service.start()
    wait_until("the service name", lambda: service.role is Role.OWNER)
    runner = FakeRunner(bus)
    assert runner.answer == tcmuservice.IN_QUEUE  # ALLOW_REPLACEMENT alone does not let it replace us
    wait_until("tcmu-runner to own the service", runner.owns)
    wait_until("RegisterHandler", lambda: runner.registered)
    wait_until("the registered role", lambda: service.role is Role.REGISTERED)
    runner.conn.close()  # tcmu-runner exits
    wait_until("the service name back", lambda: service.role is Role.OWNER)
    again = FakeRunner(bus)  # and restarts: registered again
    wait_until("RegisterHandler again", lambda: again.registered)
    assert service.runner_calls == [1, 1]  # type: ignore[attr-defined]


def test_no_bus_is_one_event_and_serving_goes_on(tmp_path: Path) -> None:
    s = TcmuService("lazy", DESC, check, address=f"unix:path={tmp_path / 'none'}")
    with structlog.testing.capture_logs() as logs:
        s.start()
        gevent.sleep(1.0)  # five retries at 0.2 s
        s.stop()
    down = [e for e in logs if e["event"] == "dbus_unavailable"]
    assert len(down) == 1 and "No such file" in down[0]["error"], logs
    assert s.role is Role.NONE


def test_a_message_over_the_limit_ends_the_connection_before_it_is_buffered(bus: str,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             service: TcmuService) -> None:
    monkeypatch.setattr(busmod, "MAX_MESSAGE", 64 << 10)
    service.start()
    wait_until("the service name", lambda: service.role is Role.OWNER)
    first = service.conn
    with structlog.testing.capture_logs() as logs:
        r = dbus_send(bus, SERVICE, "/org/kernel/TCMUService1/lazy", "org.kernel.TCMUService1.CheckConfig",
                      "string:lazy/" + "x" * (100 << 10))
        assert r.returncode != 0
        wait_until("a new connection", lambda: service.conn is not first and service.role is Role.OWNER)
    (gone,) = [e for e in logs if e["event"] == "dbus_disconnected"]
    assert f"(we take at most {64 << 10})" in gone["error"]


def test_a_call_without_answer_fails_after_its_timeout(bus: str) -> None:
    silent = Connection(bus, on_call=lambda msg: None, on_signal=lambda msg: None)
    silent.connect()
    caller = Connection(bus, on_call=lambda msg: None, on_signal=lambda msg: None)
    caller.connect()
    target = busmod.DBusAddress("/x", bus_name=silent.unique_name, interface="x.y")
    with pytest.raises(BusError, match=r"Z: no reply in 0.3 s"):
        caller.call(new_method_call(target, "Z"), timeout=0.3)
    nobody = busmod.DBusAddress("/x", bus_name="org.example.none", interface="x.y")
    with pytest.raises(BusError, match=r"org\.freedesktop\.DBus\.Error\.ServiceUnknown"):
        caller.call(new_method_call(nobody, "Z"), timeout=5)
    silent.close()
    caller.close()


def test_message_size_reads_the_fixed_header() -> None:
    msg = new_method_call(BUS, "RequestName", "su", ("a.b", 0))
    raw = msg.serialise(serial=1)
    assert busmod.message_size(raw[:16]) == len(raw)
    with pytest.raises(BusError, match="endianness"):
        busmod.message_size(b"x" + raw[1:16])
