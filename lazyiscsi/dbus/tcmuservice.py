"""The ``lazy`` handler on D-Bus, the way stock targetcli finds TCMU handlers.

targetcli (``ui_backstore.py``) lists ``user:<subtype>`` backstores from GetManagedObjects on
``org.kernel.TCMUService1`` at ``/org/kernel/TCMUService1`` (ObjectManager): each object with
interface ``org.kernel.TCMUService1`` (property ``ConfigDesc``, method ``CheckConfig(s) ->
(b, s)``) becomes a node, and ``create`` asks ``CheckConfig("<subtype>/<cfgstring>")`` first.
Two cases, as tcmu-runner's ``main.c`` and ``libtcmu-register.c`` settle them:

- tcmu-runner runs: it owns ``org.kernel.TCMUService1``. An external handler owns
  ``org.kernel.TCMUService1.HandlerManager1.<subtype>``, serves the interface at
  ``/org/kernel/TCMUService1/HandlerManager1/<subtype>`` (tcmu-runner forwards CheckConfig there)
  and calls ``RegisterHandler(subtype, cfgdesc)`` on ``/org/kernel/TCMUService1/HandlerManager1``;
  again whenever tcmu-runner (re)appears, since it forgets its D-Bus handlers when it exits.
- tcmu-runner is absent: we own ``org.kernel.TCMUService1`` ourselves, with ``ALLOW_REPLACEMENT``
  and an ObjectManager listing ``/org/kernel/TCMUService1/<subtype>``. tcmu-runner asks for the
  name with no flags (``G_BUS_NAME_OWNER_FLAGS_NONE``), so it neither replaces us nor gives up:
  it waits in the name's queue. The bus says nothing when a name gets a queued owner, so while we
  own it we look at ``ListQueuedOwners`` every ``QUEUE_POLL`` s and release the name as soon as
  someone waits; the bus then hands it over (NameOwnerChanged) and we register as above.

We always own the HandlerManager1 name and serve both object paths: which one a caller uses
depends only on who owns the service name. A bus that is absent or refuses us is one log event
and a retry every ``RECONNECT`` s; serving never depends on it. ``on_runner`` is called each
time tcmu-runner takes the service name (the LIO frontend turns the kernel's netlink replies
off then: see ``lazyiscsi.tcmu.handler``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import gevent
import structlog
from jeepney import DBusAddress, new_error, new_method_call, new_method_return
from jeepney.bus_messages import MatchRule
from jeepney.low_level import HeaderFields, Message

from lazyiscsi.dbus.bus import BUS, BusError, Connection

log = structlog.get_logger("lazyiscsi.dbus")

SERVICE = "org.kernel.TCMUService1"
INTERFACE = "org.kernel.TCMUService1"
ROOT = "/org/kernel/TCMUService1"
MANAGER = "/org/kernel/TCMUService1/HandlerManager1"
MANAGER_INTERFACE = "org.kernel.TCMUService1.HandlerManager1"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"

#: RequestName flags and answers (D-Bus spec, "org.freedesktop.DBus.RequestName")
ALLOW_REPLACEMENT, DO_NOT_QUEUE = 0x1, 0x4
PRIMARY_OWNER, IN_QUEUE, EXISTS, ALREADY_OWNER = 1, 2, 3, 4

#: each call we make on the bus daemon: it answers locally at once
BUS_CALL_TIMEOUT = 10.0
#: RegisterHandler: tcmu-runner answers once its watch on our name fires, which is at once as we
#: own it already; a tcmu-runner stuck for longer is told again at its next appearance
REGISTER_TIMEOUT = 15.0
#: how often, while we own the service name, we look whether tcmu-runner waits for it
QUEUE_POLL = 2.0
#: how long after losing or not finding the bus we try again
RECONNECT = 10.0


class Role(enum.Enum):
    """Who answers for ``org.kernel.TCMUService1``."""

    NONE = "none"  # not connected
    OWNER = "owner"  # us: no tcmu-runner
    REGISTERED = "registered"  # tcmu-runner, which knows our handler
    WAITING = "waiting"  # tcmu-runner, not (yet) answering RegisterHandler


class TcmuService:
    """Serves one handler subtype's CheckConfig and ConfigDesc on a bus, in either role."""

    def __init__(self, subtype: str, config_desc: str, check_config: Callable[[str], str | None], *,
                 address: str = SYSTEM_BUS, on_runner: Callable[[], None] | None = None) -> None:
        self.subtype, self.config_desc, self.check_config = subtype, config_desc, check_config
        self.address = address
        self.on_runner = on_runner
        self.handler_name = f"{MANAGER_INTERFACE}.{subtype}"
        self.handler_path = f"{MANAGER}/{subtype}"
        self.own_path = f"{ROOT}/{subtype}"
        self.role = Role.NONE
        self.runner = ""  # the unique name of the service's other owner (tcmu-runner)
        self.conn: Connection | None = None
        self._main: gevent.Greenlet | None = None
        self._reported_down = False

    def start(self) -> None:
        self._main = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._main is not None:
            self._main.kill()
        if self.conn is not None:
            self.conn.close()
        self.role = Role.NONE

    # -- the connection's life --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            conn = Connection(self.address, on_call=self._on_call, on_signal=self._on_signal)
            try:
                conn.connect()
                self.conn = conn
                self._setup(conn)
            except BusError as e:
                conn.close()
                if not self._reported_down:  # one event, not one per retry
                    log.warning("dbus_unavailable", bus=self.address, error=str(e),
                                consequence=f"targetcli does not list user:{self.subtype} until the bus "
                                            f"answers; retrying every {RECONNECT:g} s")
                    self._reported_down = True
                self.role = Role.NONE
                gevent.sleep(RECONNECT)
                continue
            self._reported_down = False
            log.info("dbus_connected", bus=self.address, unique_name=conn.unique_name, role=self.role.value)
            poller = gevent.spawn(self._poll_queue, conn)
            conn.closed.wait()
            poller.kill()
            self.role = Role.NONE
            gevent.sleep(RECONNECT)

    def _bus(self, conn: Connection, member: str, signature: str | None = None, body: tuple = ()) -> tuple:  # type: ignore[type-arg]
        return conn.call(new_method_call(BUS, member, signature, body), timeout=BUS_CALL_TIMEOUT).body  # type: ignore[no-any-return]

    def _setup(self, conn: Connection) -> None:
        rule = MatchRule(type="signal", sender=BUS.bus_name, interface=BUS.interface,
                         member="NameOwnerChanged", path=BUS.object_path)
        rule.add_arg_condition(0, SERVICE)
        self._bus(conn, "AddMatch", "s", (rule.serialise(),))
        try:
            (answer,) = self._bus(conn, "RequestName", "su", (self.handler_name, DO_NOT_QUEUE))
        except BusError as e:
            raise BusError(f"owning {self.handler_name} refused ({e.name or e}): is the D-Bus policy "
                           f"file for it installed?") from None
        if answer not in (PRIMARY_OWNER, ALREADY_OWNER):
            raise BusError(f"{self.handler_name} is owned by another process (another lazyiscsi serve?)")
        (has_owner,) = self._bus(conn, "NameHasOwner", "s", (SERVICE,))
        if has_owner:
            (owner,) = self._bus(conn, "GetNameOwner", "s", (SERVICE,))
            self._runner_appeared(conn, owner)
        else:
            self._take_service(conn)

    def _take_service(self, conn: Connection) -> None:
        try:
            (answer,) = self._bus(conn, "RequestName", "su", (SERVICE, ALLOW_REPLACEMENT | DO_NOT_QUEUE))
        except BusError as e:
            log.warning("dbus_service_refused", name=SERVICE, error=str(e),
                        consequence=f"targetcli lists user:{self.subtype} only once tcmu-runner runs")
            return
        if answer in (PRIMARY_OWNER, ALREADY_OWNER):
            self.role, self.runner = Role.OWNER, ""
            log.info("dbus_service_owned", name=SERVICE, path=self.own_path)
        # EXISTS: tcmu-runner took it a moment ago; its NameOwnerChanged says so

    def _poll_queue(self, conn: Connection) -> None:
        while not conn.closed.is_set():
            gevent.sleep(QUEUE_POLL)
            if self.role is not Role.OWNER:
                continue
            try:
                (owners,) = self._bus(conn, "ListQueuedOwners", "s", (SERVICE,))
                waiting = [o for o in owners if o != conn.unique_name]
                if waiting:
                    log.info("dbus_service_yielded", name=SERVICE, to=waiting)
                    self._bus(conn, "ReleaseName", "s", (SERVICE,))
                    self.role = Role.WAITING  # until NameOwnerChanged names the new owner
            except BusError as e:
                log.warning("dbus_queue_check_failed", name=SERVICE, error=str(e))

    def _on_signal(self, msg: Message) -> None:
        fields = msg.header.fields
        if (fields.get(HeaderFields.member) != "NameOwnerChanged"
                or fields.get(HeaderFields.sender) != BUS.bus_name):
            return
        name, _old, new = msg.body
        conn = self.conn
        if name != SERVICE or conn is None:
            return
        # the reader greenlet delivers signals: calls are made from another, which it answers
        if new == conn.unique_name:
            self.role, self.runner = Role.OWNER, ""
        elif new:
            gevent.spawn(self._runner_appeared, conn, new)
        else:
            log.info("dbus_runner_gone", name=SERVICE, owner=self.runner)
            self.role, self.runner = Role.NONE, ""
            gevent.spawn(self._take_service, conn)

    def _runner_appeared(self, conn: Connection, owner: str) -> None:
        """tcmu-runner owns the service: tell it about our handler, and the frontend about it."""
        self.runner, self.role = owner, Role.WAITING
        if self.on_runner is not None:
            self.on_runner()
        manager = DBusAddress(MANAGER, bus_name=SERVICE, interface=MANAGER_INTERFACE)
        try:
            ok, message = conn.call(new_method_call(manager, "RegisterHandler", "ss",
                                                    (self.subtype, self.config_desc)),
                                    timeout=REGISTER_TIMEOUT).body
        except BusError as e:
            ok, message = False, str(e)
        if ok and self.runner == owner:
            self.role = Role.REGISTERED
            log.info("dbus_handler_registered", name=SERVICE, owner=owner, subtype=self.subtype)
        elif not ok:
            log.warning("dbus_register_failed", name=SERVICE, owner=owner, subtype=self.subtype,
                        error=message)

    # -- what we serve ----------------------------------------------------------------------------

    def _on_call(self, msg: Message) -> Message:
        f = msg.header.fields
        path, member = f.get(HeaderFields.path), f.get(HeaderFields.member)
        interface = f.get(HeaderFields.interface)
        if path in (self.handler_path, self.own_path):
            if member == "CheckConfig" and interface in (INTERFACE, None):
                return self._check_config(msg)
            if interface == PROPERTIES and member in ("Get", "GetAll"):
                return self._properties(msg, member)
            if interface == INTROSPECTABLE and member == "Introspect":
                return new_method_return(msg, "s", (INTROSPECTION,))
        if path == ROOT and member == "GetManagedObjects" and interface in (OBJECT_MANAGER, None):
            objects = {self.own_path: {INTERFACE: {"ConfigDesc": ("s", self.config_desc)}}}
            return new_method_return(msg, "a{oa{sa{sv}}}", (objects,))
        return new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s",
                         (f"no method {interface}.{member} at {path}",))

    def _check_config(self, msg: Message) -> Message:
        if msg.header.fields.get(HeaderFields.signature) != "s":
            return new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "s",
                             ("CheckConfig takes one string",))
        (cfgstring,) = msg.body
        reason = self.check_config(cfgstring)
        log.info("dbus_check_config", config=cfgstring, accepted=reason is None, reason=reason)
        return new_method_return(msg, "bs", (reason is None, reason or "OK"))

    def _properties(self, msg: Message, member: str) -> Message:
        args = msg.body
        if not args or args[0] not in (INTERFACE, ""):
            return new_error(msg, "org.freedesktop.DBus.Error.UnknownInterface", "s",
                             (f"no interface {args[0] if args else ''!r} here",))
        if member == "GetAll":
            return new_method_return(msg, "a{sv}", ({"ConfigDesc": ("s", self.config_desc)},))
        if len(args) < 2 or args[1] != "ConfigDesc":
            return new_error(msg, "org.freedesktop.DBus.Error.UnknownProperty", "s",
                             (f"no property {args[1] if len(args) > 1 else ''!r}",))
        return new_method_return(msg, "v", (("s", self.config_desc),))


#: what Introspect answers at the handler's paths (tcmu-runner's tcmu-handler.xml, our part)
INTROSPECTION = """<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<node>
  <interface name="org.kernel.TCMUService1">
    <property name="ConfigDesc" type="s" access="read"/>
    <method name="CheckConfig">
      <arg type="s" name="configstr" direction="in"/>
      <arg type="b" name="is_valid" direction="out"/>
      <arg type="s" name="message" direction="out"/>
    </method>
  </interface>
</node>
"""
