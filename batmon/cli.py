"""The `batmon` command: serve, backup, restore, user add/list/notify/reset-key/token, db copy,
simulate, agent vedirect.

Every failure is one line on stderr: exit 2 for bad usage, 1 at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from bridge.config import ServeOptions
from bridge.errors import BatmonError
from bridge.models import describe_error

ENV_PREFIX = "BATMON_"
SERVE_OPTIONS = ("data_dir", "host", "http_port", "mqtt_port", "mqtt_url", "database_url", "broker_config",
                 "mqtt_share_group", "mqtt_client_id", "base_topic", "discovery_prefix", "discovery",
                 "notify_retry_s", "notify_give_up_s", "notify_lease_s", "metrics", "metrics_token",
                 "metrics_per_batmon",
                 "retention_days", "http_max_connections", "mqtt_tls_port", "tls_cert", "tls_key",
                 "tls_client_ca", "http_tls_cert", "http_tls_key", "mqtt_ca", "mqtt_client_cert",
                 "mqtt_client_key")  # fmt: skip


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def build_parser() -> Parser:
    parser = Parser(prog="batmon", description="Self-hosted battery monitor bridge.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    serve = commands.add_parser("serve", help="run broker + bridge + HTTP API")
    serve.add_argument("--data-dir", help="folder of the SQLite file (default ./batmon-data)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--http-port", help="HTTP port, 0 picks a free one (default 8080)")
    serve.add_argument("--mqtt-port", help="embedded broker port, 0 picks one, off: TLS only (default 1883)")
    serve.add_argument("--mqtt-url", help="use this broker, e.g. mqtt://user:pass@host:1883")
    serve.add_argument("--mqtt-share-group", help="with --mqtt-url: take updates through"
                       " $share/NAME/..., one part each for N workers (default: a plain subscription)")
    serve.add_argument("--mqtt-client-id", help="with --mqtt-url: this worker's MQTT client id, the same"
                       " across its restarts (default batmon-bridge-<base topic>)")
    serve.add_argument("--database-url", help="PostgreSQL instead of the SQLite file, e.g."
                       " postgresql://user@host:5432/batmon (or BATMON_DATABASE_URL)")
    serve.add_argument("--broker-config",
                       help="embedded broker config (default ./broker.yaml, else the shipped one)")
    serve.add_argument("--base-topic", help="MQTT topic prefix (default batmon)")
    serve.add_argument("--discovery-prefix", help="Home Assistant prefix (homeassistant)")
    serve.add_argument("--no-discovery", dest="discovery", action="store_const", const=False,
                       help="do not publish Home Assistant discovery")  # fmt: skip
    serve.add_argument("--notify-retry-s", help="first retry delay of a failed notice, doubling (30)")
    serve.add_argument("--notify-give-up-s", help="stop retrying a notice after this long (86400)")
    serve.add_argument("--notify-lease-s", help="a notice in flight on a worker that died is sent by"
                       " another after this long (30; several workers on PostgreSQL)")
    serve.add_argument("--metrics", help="who may read /metrics: off, local (loopback, default) or token")
    serve.add_argument("--metrics-token", help="bearer token for --metrics token (or BATMON_METRICS_TOKEN)")
    serve.add_argument("--metrics-per-batmon", action="store_const", const=True,
                       help="also export each batmon's values (one series set per batmon)")
    serve.add_argument("--retention-days",
                       help="prune raw readings older than this; hourly rollups stay (keep all)")
    serve.add_argument("--http-max-connections",
                       help="open HTTP connections; one more gets a 503 (default 512)")
    serve.add_argument("--mqtt-tls-port", help="embedded broker's TLS port, 0 picks one (none)")
    serve.add_argument("--tls-cert", help="PEM certificate (chain) of the MQTT TLS listener")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", help="require MQTT TLS clients' certificates signed by this CA")
    serve.add_argument("--http-tls-cert", help="serve HTTPS with this PEM certificate (chain)")
    serve.add_argument("--http-tls-key", help="PEM private key of --http-tls-cert")
    add_mqtt_client_tls(serve)

    user = commands.add_parser("user", help="manage users")
    user_commands = user.add_subparsers(dest="user_command", required=True, parser_class=Parser)
    add = user_commands.add_parser("add", help="create a user; prints its api_key")
    add.add_argument("email")
    listing = user_commands.add_parser("list", help="list users")
    notify = user_commands.add_parser("notify", help="set a user's Apprise target URLs")
    notify.add_argument("email")
    notify.add_argument("--email", dest="email_url", help="Apprise URL for email notices")
    notify.add_argument("--whatsapp", dest="whatsapp_url", help="Apprise URL for WhatsApp")
    notify.add_argument("--sms", dest="sms_url", help="Apprise URL for SMS")
    reset = user_commands.add_parser("reset-key", help="give a user a new api_key; the old one stops working")
    reset.add_argument("email")
    token = user_commands.add_parser("token", help="MQTT-only secrets of a user (for Home Assistant)")
    tokens = token.add_subparsers(dest="token_command", required=True, parser_class=Parser)
    token_add = tokens.add_parser("add", help="make a token; prints its secret once")
    token_add.add_argument("email")
    token_add.add_argument("--name", required=True, help="what it is for, e.g. home-assistant")
    token_list = tokens.add_parser("list", help="a user's tokens: names and creation dates")
    token_list.add_argument("email")
    token_revoke = tokens.add_parser("revoke", help="delete a token; its sessions are closed")
    token_revoke.add_argument("email")
    token_revoke.add_argument("name")
    for sub in (add, listing, notify, reset, token_add, token_list, token_revoke):
        sub.add_argument("--data-dir", help="folder of the SQLite file (default ./batmon-data)")
        sub.add_argument("--database-url", help="the PostgreSQL database serve uses (or BATMON_DATABASE_URL)")

    sim = commands.add_parser("simulate", help="publish plausible readings over MQTT")
    sim.add_argument("--mqtt-url", help="broker to publish to, e.g. mqtt://127.0.0.1:1883")
    sim.add_argument("--mqtt-port", help="port of serve's embedded broker on 127.0.0.1 (as serve's"
                     " --mqtt-port; default: ask --api-url's /healthz, else 1883)")  # fmt: skip
    sim.add_argument("--confirm-timeout", type=float, default=10.0,
                     help="seconds for the first readings to show on the state topics (10)")  # fmt: skip
    sim.add_argument("--base-topic", default=os.environ.get("BATMON_BASE_TOPIC", "batmon"))
    sim.add_argument("--device", action="append", default=[], metavar="ID:TOKEN",
                     help="a batmon to simulate (repeatable)")  # fmt: skip
    sim.add_argument("--api-url", help="create --count batmons through this HTTP API first")
    sim.add_argument("--api-key", default=os.environ.get("BATMON_API_KEY"))
    sim.add_argument("--count", type=int, default=1, help="batmons to create (with --api-url)")
    sim.add_argument("--interval", type=float, default=5.0, help="seconds between readings")
    sim.add_argument("--readings", type=int, default=None, help="stop after this many rounds")

    backup = commands.add_parser("backup", help="copy the database to FILE, also while serve runs")
    backup.add_argument("file", type=Path)
    backup.add_argument("--compact", action="store_true",
                        help="write a compacted copy (VACUUM INTO): smaller, more CPU")  # fmt: skip
    restore = commands.add_parser("restore", help="replace the database with backup FILE (serve stopped)")
    restore.add_argument("file", type=Path)
    for sub in (backup, restore):
        sub.add_argument("--data-dir", help="folder of the SQLite file (default ./batmon-data)")

    db = commands.add_parser("db", help="move the database")
    db_commands = db.add_subparsers(dest="db_command", required=True, parser_class=Parser)
    db_copy = db_commands.add_parser(
        "copy", help="copy the data folder's SQLite database into an empty PostgreSQL one (serve stopped)")
    db_copy.add_argument("--to", required=True, metavar="URL",
                         help="the empty target, e.g. postgresql://batmon@db-host:5432/batmon")  # fmt: skip
    db_copy.add_argument("--data-dir", help="folder of the SQLite file (default ./batmon-data)")

    agent = commands.add_parser("agent", help="run beside a device and feed a batmon server")
    agents = agent.add_subparsers(dest="agent_command", required=True, parser_class=Parser)
    ve = agents.add_parser("vedirect", help="a Victron BMV/SmartShunt/MPPT on a serial port")
    ve.add_argument("--port", help="serial device of the VE.Direct cable, e.g. /dev/ttyUSB0")
    ve.add_argument("--replay", help="play this recorded dump instead of reading a port")
    ve.add_argument("--batmon-id", help="the batmon these readings belong to")
    ve.add_argument("--token", help="its batmon_token (the MQTT password)")
    ve.add_argument("--mqtt-url", help="broker, e.g. mqtt://host:1883 (default 127.0.0.1:1883)")
    ve.add_argument("--base-topic", help="MQTT topic prefix of the server (default batmon)")
    ve.add_argument("--interval", help="seconds between readings (default 10)")
    ve.add_argument("--average", action="store_const", const=True,
                    help="send the interval's average of V, I, P, SOC, not the latest block")
    ve.add_argument("--data-dir", help="folder of the durable queue (default ./batmon-agent-data)")
    ve.add_argument("--queue-max", help="readings kept while offline; oldest dropped (100000)")
    ve.add_argument("--first-block-timeout", help="give up if no valid block by then (10 s)")
    ve.add_argument("--replay-rate", help="blocks per second of --replay (default 1)")
    ve.add_argument("--replay-loop", action="store_const", const=True,
                    help="start --replay over at its end")  # fmt: skip
    for client in (ve, sim):
        add_mqtt_client_tls(client)
    return parser


def add_mqtt_client_tls(parser: argparse.ArgumentParser) -> None:
    """The options of a client of an mqtts:// broker: serve, the agent and simulate alike."""
    parser.add_argument("--mqtt-ca", help="CA of the mqtts:// broker's certificate (default: the system's)")
    parser.add_argument("--mqtt-client-cert", help="our PEM certificate, for a broker that asks for one")
    parser.add_argument("--mqtt-client-key", help="PEM private key of --mqtt-client-cert")


def options_from(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """Flags over BATMON_<NAME> environment variables; the model adds the defaults."""
    values: dict[str, Any] = {}
    for name in names:
        env = os.environ.get(ENV_PREFIX + name.upper())
        if env is not None:
            values[name] = env
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    return values


def option_error(exc: ValidationError) -> str:
    """A validation error as the flag it is about: `--name: problem`."""
    name, sep, problem = describe_error(exc).partition(": ")
    if not sep and name.endswith(" is required."):
        return f"--{name.removesuffix(' is required.').replace('_', '-')} is required."
    return f"--{name.replace('_', '-')}: {problem}" if sep else name


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """`serve` options: flags over BATMON_<NAME> over defaults, validated."""
    try:
        return ServeOptions.model_validate(options_from(args, SERVE_OPTIONS))
    except ValidationError as exc:
        fail(f"batmon serve: {option_error(exc)}", code=2)


def agent_options(args: argparse.Namespace) -> Any:
    """`agent vedirect` options: flags over BATMON_<NAME> over defaults, validated."""
    from bridge.agent.options import AGENT_OPTIONS, AgentOptions

    try:
        return AgentOptions.model_validate(options_from(args, AGENT_OPTIONS))
    except ValidationError as exc:
        fail(f"batmon agent vedirect: {option_error(exc)}", code=2)


def run_agent(args: argparse.Namespace) -> None:
    """`batmon agent vedirect`: serial port (or recording) to batmon over MQTT, until SIGTERM."""
    import threading

    from bridge.agent.vedirect_agent import AgentError, run_agent

    options = agent_options(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stats = run_agent(options, stop, announce=lambda line: print(line, flush=True))
    except AgentError as exc:
        fail(f"batmon agent vedirect: {exc}", code=exc.code)
    print(f"stopped: {stats}", flush=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and the exit code; never a traceback."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)


def data_dir_of(args: argparse.Namespace) -> Path:
    value = args.data_dir or os.environ.get("BATMON_DATA_DIR") or "batmon-data"
    return Path(value)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `batmon` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions", "uvicorn.error", "apprise"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            serve_holding_data_dir(serve_options(args))
        elif args.command in ("backup", "restore"):
            run_backup_or_restore(args)
        elif args.command == "user":
            run_user(args)
        elif args.command == "db":
            run_db_copy(args)
        elif args.command == "simulate":
            asyncio.run(run_simulate(args))
        elif args.command == "agent":
            run_agent(args)
    except KeyboardInterrupt:
        pass


async def run_serve(options: ServeOptions) -> None:
    """Start the service, print where it listens, run until SIGINT/SIGTERM."""
    from batmon.service import Service, ServiceError

    service = Service(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except ServiceError as exc:
        fail(f"batmon serve: {exc}", code=exc.code)
    broker = "embedded broker" if service.broker is not None else "external broker"
    print(f"HTTP  {service.http_url}", flush=True)
    scheme = "mqtts" if options.mqtt_url and options.mqtt_url.strip().lower().startswith("mqtts") else "mqtt"
    print(f"MQTT  {scheme}://{service.mqtt_host}:{service.mqtt_port} ({broker}"
          f"{'; loopback only, for the bridge: --mqtt-port off' if options.mqtt_port is None else ''})",
          flush=True)  # fmt: skip
    if service.broker is not None and service.broker.tls_port is not None:
        print(f"MQTTS mqtts://{options.host}:{service.broker.tls_port} (embedded broker, TLS)", flush=True)
    print(f"data  {service.store_description}", flush=True)
    if service.admin_api_key:
        print(f"created user admin@localhost; api_key (shown once): {service.admin_api_key}",
              flush=True)  # fmt: skip
    # Handlers were installed before this line: a stop right after "ready" is clean.
    print("ready (Ctrl-C stops)", flush=True)
    await stop.wait()
    await service.stop()


def serve_holding_data_dir(options: ServeOptions) -> None:
    """`serve`, owning the data folder: a second serve (or a restore) on it is refused."""
    from bridge.data_lock import DataDirInUse, lock_data_dir

    try:
        lock = lock_data_dir(options.data_dir)
    except DataDirInUse as exc:
        fail(f"batmon serve: {exc}")
    except OSError as exc:
        fail(f"batmon serve: cannot use data folder {options.data_dir}: {exc.strerror}")
    try:
        asyncio.run(run_serve(options))
    finally:
        lock.release()


def run_backup_or_restore(args: argparse.Namespace) -> None:
    """`batmon backup FILE` (while serve runs, too) and `batmon restore FILE` (serve stopped)."""
    from bridge.data_lock import DataDirInUse, lock_data_dir
    from bridge.store.backup import BackupError, backup_database, restore_database
    from bridge.store.db import DB_FILENAME

    command = f"batmon {args.command}"
    data_dir = data_dir_of(args)
    database = data_dir / DB_FILENAME
    try:
        if args.command == "backup":
            if not data_dir.is_dir():
                fail(f"{command}: no data folder {data_dir}")
            done = backup_database(database, args.file, compact=args.compact)
            print(f"backed up {database} to {done.path} ({done.size_bytes} bytes, schema"
                  f" {done.schema_version}, {done.seconds:.1f} s)", flush=True)  # fmt: skip
            return
        lock = lock_data_dir(data_dir)  # held while the file is swapped: no serve may start
        try:
            replaced = restore_database(args.file, database)
        finally:
            lock.release()
        print(f"restored {args.file} into {database}", flush=True)
        if replaced is not None:
            print(f"the database it replaced is kept as {replaced}", flush=True)
    except (BackupError, DataDirInUse) as exc:
        fail(f"{command}: {exc}")
    except OSError as exc:
        fail(f"{command}: {exc.filename or data_dir}: {exc.strerror}")


def run_db_copy(args: argparse.Namespace) -> None:
    """`batmon db copy --to URL`: the data folder's SQLite database into an empty PostgreSQL
    database, holding the folder's lock (serve stopped); the URL is never printed."""
    from bridge.config import check_database_url
    from bridge.data_lock import DataDirInUse, lock_data_dir
    from bridge.errors import StorageFailed
    from bridge.store.copy import CopyError, copy_to_postgres
    from bridge.store.db import DB_FILENAME

    command = "batmon db copy"
    try:
        check_database_url(args.to)
    except ValueError as exc:
        fail(f"{command}: --to: {exc}", code=2)
    data_dir = data_dir_of(args)
    if not (data_dir / DB_FILENAME).is_file():
        fail(f"{command}: no database in {data_dir}: give the folder serve uses with --data-dir"
             " (or BATMON_DATA_DIR)")  # fmt: skip
    try:
        lock = lock_data_dir(data_dir)  # no serve may write the file meanwhile
    except DataDirInUse as exc:
        fail(f"{command}: {exc}")
    except OSError as exc:
        fail(f"{command}: cannot use data folder {data_dir}: {exc.strerror}")
    try:
        report = copy_to_postgres(data_dir / DB_FILENAME, args.to,
                                  progress=lambda line: print(line, flush=True))  # fmt: skip
    except CopyError as exc:
        fail(f"{command}: {exc}")
    except StorageFailed as exc:  # names user@host:port/db, never the password
        fail(f"{command}: {exc.message}")
    except OSError as exc:  # the SQLite file could not be opened
        fail(f"{command}: {exc.strerror or exc}")
    finally:
        lock.release()
    readings = report.counts.get("readings", 0)
    rate = readings / report.readings_seconds if report.readings_seconds > 0 else 0.0
    print(f"copied {data_dir / DB_FILENAME} into postgresql://{report.target} in {report.seconds:.1f} s"
          f" ({readings:,} readings in {report.readings_seconds:.1f} s, {rate:,.0f}/s); counts match:"
          + ",".join(f" {table} {n:,}" for table, n in report.counts.items()), flush=True)  # fmt: skip
    print("serve from it with --database-url (or BATMON_DATABASE_URL); the SQLite file is unchanged",
          flush=True)  # fmt: skip


def run_user(args: argparse.Namespace) -> None:
    """`batmon user add|list|notify|reset-key|token` on the data folder's database, or on PostgreSQL."""
    from bridge.store.db import Store

    database_url = args.database_url or os.environ.get("BATMON_DATABASE_URL")
    if database_url:
        run_user_on(args, open_postgres(args, database_url))
        return
    data_dir = data_dir_of(args).resolve()
    # Only `user add` (and serve) make a data folder: any other command run from the wrong
    # folder would otherwise read a new, empty database and print nothing.
    creating = not data_dir.exists()
    if creating and args.user_command != "add":
        fail(f"batmon user {args.user_command}: no data folder at {data_dir}: give the one serve"
             f" uses with --data-dir (or BATMON_DATA_DIR); `batmon user add` creates one")  # fmt: skip
    try:
        store = Store.open(data_dir / "batmon.sqlite3")
    except OSError as exc:
        fail(f"batmon user: cannot use data folder {data_dir}: {exc.strerror}")
    if creating:
        print(f"created data folder {data_dir}", file=sys.stderr, flush=True)
    run_user_on(args, store)


def open_postgres(args: argparse.Namespace, url: str) -> Any:
    """The PostgreSQL store at ``url``, or one line naming what is wrong (never the password)."""
    from bridge.config import check_database_url
    from bridge.errors import StorageFailed
    from bridge.store.pg_store import PostgresStore

    try:
        check_database_url(url)
        return PostgresStore.open(url)
    except ValueError as exc:
        fail(f"batmon user {args.user_command}: --database-url: {exc}", code=2)
    except StorageFailed as exc:
        fail(f"batmon user {args.user_command}: {exc.message}")


def run_user_on(args: argparse.Namespace, store: Any) -> None:
    """`batmon user ...` on an opened store (closed at the end)."""
    from bridge.core import Core
    from bridge.events import EventBus
    from bridge.models import NewUser

    core = Core(store, EventBus()).load()
    command = " ".join(filter(None, (args.user_command, getattr(args, "token_command", None))))
    try:
        if args.user_command == "add":
            email = NewUser.model_validate({"email": args.email}).email
            _, api_key = core.create_user(email)
            print(api_key)
        elif args.user_command == "list":
            for row in store.users():
                print(row["email"])
        elif args.user_command == "notify":
            set_user_targets(core, args)
        elif args.user_command == "reset-key":
            print(core.reset_api_key(NewUser.model_validate({"email": args.email}).email))
        elif args.user_command == "token":
            run_user_token(core, args)
    except ValidationError as exc:
        fail(f"batmon user {command}: {describe_error(exc)}", code=2)
    except BatmonError as exc:
        fail(f"batmon user {command}: {exc.message}")
    finally:
        store.close()


def run_user_token(core: Any, args: argparse.Namespace) -> None:
    """`batmon user token add|list|revoke`: a running server honours each within a second."""
    from datetime import UTC, datetime

    from bridge.models import NewUser, UserTokenName

    if args.token_command == "list":
        email = NewUser.model_validate({"email": args.email}).email
        for token in core.mqtt_tokens(email):
            created = datetime.fromtimestamp(token["created"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            print(f"{token['name']}  created {created}")
        return
    spec = UserTokenName.model_validate({"email": args.email, "name": args.name})
    if args.token_command == "add":
        print(core.add_mqtt_token(spec.email, spec.name))
        print(f"MQTT username {spec.email}, password the line above (shown once); it sees"
              f" {spec.email}'s batmons and works over MQTT only", file=sys.stderr, flush=True)  # fmt: skip
    else:
        core.revoke_mqtt_token(spec.email, spec.name)
        print(f"revoked token {spec.name} of {spec.email}", file=sys.stderr, flush=True)


def set_user_targets(core: Any, args: argparse.Namespace) -> None:
    """Validate and store the Apprise URLs given, then print the masked result."""
    from bridge.extensions.notifier import set_targets, targets_view
    from bridge.models import NotificationTargets

    row = core.store.user_by_email(args.email.lower())
    if row is None:
        fail(f"batmon user notify: no user with email {args.email}")
    given = {k: v for k in ("email_url", "whatsapp_url", "sms_url")
             if (v := getattr(args, k)) is not None}  # fmt: skip
    targets = NotificationTargets.model_validate(given)
    set_targets(core.store, row["id"], targets)
    for channel, url in targets_view(core.store, row["id"]).items():
        print(f"{channel}: {url or '-'}")


async def run_simulate(args: argparse.Namespace) -> None:
    """Publish readings for given devices, or for new batmons made through the API."""
    from bridge.config import DEFAULT_MQTT_PORT
    from bridge.doors.mqtt_link import MqttConnectError
    from bridge.simulate import SimulateError, create_batmons, health_mqtt_address, simulate

    try:
        address = simulate_mqtt_address(args)
        tls = simulate_tls(args)
    except ValueError as exc:
        fail(f"batmon simulate: {exc}", code=2)
    if args.count < 1 or args.interval <= 0:
        fail("batmon simulate: --count must be at least 1 and --interval above 0", code=2)
    devices: list[tuple[int, str]] = []
    for spec in args.device:
        batmon_id, _, token = spec.partition(":")
        if not batmon_id.isdigit() or not token:
            fail(f"batmon simulate: --device {spec!r} is not ID:TOKEN", code=2)
        devices.append((int(batmon_id), token))
    if args.api_url and not args.api_key:
        fail("batmon simulate: --api-url needs --api-key (or BATMON_API_KEY)", code=2)
    if not devices and not args.api_url:
        fail("batmon simulate: give --device ID:TOKEN or --api-url with --api-key", code=2)
    if args.confirm_timeout <= 0:
        fail("batmon simulate: --confirm-timeout must be above 0", code=2)
    try:
        if address is None:  # nothing given: ask the server, else the default port
            host, port = (await health_mqtt_address(args.api_url) if args.api_url
                          else ("127.0.0.1", DEFAULT_MQTT_PORT))  # fmt: skip
        else:
            host, port = address
        if args.api_url:
            devices += await create_batmons(args.api_url, args.api_key, args.count)
        print(f"simulating {len(devices)} batmon(s) on {'mqtts' if tls else 'mqtt'}://{host}:{port}",
              flush=True)  # fmt: skip
        for batmon_id, token in devices:
            print(f"  batmon_id {batmon_id} token {token}", flush=True)
        await simulate(host=host, port=port, devices=devices, interval=args.interval,
                       count=args.readings, base_topic=args.base_topic,
                       confirm_timeout=args.confirm_timeout, tls=tls,
                       announce=lambda line: print(line, flush=True))  # fmt: skip
    except (SimulateError, MqttConnectError, OSError) as exc:
        fail(f"batmon simulate: {exc}")


def simulate_tls(args: argparse.Namespace) -> Any:
    """The TLS context for an mqtts:// --mqtt-url (flags over BATMON_<NAME>), else None.

    Raises ValueError naming the bad option or file.
    """
    from bridge.config import check_client_tls, uses_tls
    from bridge.tls import client_context

    given = options_from(args, ("mqtt_url", "mqtt_ca", "mqtt_client_cert", "mqtt_client_key"))
    url = given.get("mqtt_url") or None
    ca, cert, key = (Path(v) if (v := given.get(k)) else None
                     for k in ("mqtt_ca", "mqtt_client_cert", "mqtt_client_key"))  # fmt: skip
    check_client_tls(url, ca, cert, key)
    return client_context(ca, cert, key) if url and uses_tls(url) else None


def simulate_mqtt_address(args: argparse.Namespace) -> tuple[str, int] | None:
    """The broker `simulate` publishes to, from the same flags and variables as serve
    (flag over variable; --mqtt-url over --mqtt-port); None when none is given.

    Raises ValueError naming the bad option.
    """
    from bridge.config import ServeOptions, parse_mqtt_url

    given = [("mqtt_url", args.mqtt_url), ("mqtt_port", args.mqtt_port)]
    given += [(name, os.environ.get(ENV_PREFIX + name.upper())) for name, _ in given]
    for name, value in given:
        if value in (None, ""):
            continue
        if name == "mqtt_url":
            try:
                host, port, _, _ = parse_mqtt_url(value)
            except ValueError as exc:
                raise ValueError(f"--mqtt-url: {exc}") from None
            return host, port
        try:
            plain = ServeOptions.model_validate({"mqtt_port": value}).mqtt_port
        except ValidationError:
            raise ValueError(f"--mqtt-port: {value!r} is not a port number (1-65535)") from None
        if not plain:
            raise ValueError(f"--mqtt-port: give the port serve printed, not {value}")
        return "127.0.0.1", plain
    return None


if __name__ == "__main__":
    main()
