"""The SQLite schema and its migrations.

Each migration is a list of SQL statements applied once, in order, and recorded
in ``schema_version``; a database made by an older release is brought forward on
open, and a newer one is refused rather than misread.
"""

from __future__ import annotations

from sqlite_utils import Database

MIGRATIONS: list[list[str]] = [
    # 1: users, batmons, readings history, alarms.
    [
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            email TEXT NOT NULL UNIQUE,
            api_key_hash TEXT NOT NULL UNIQUE,
            created REAL NOT NULL,
            email_url TEXT NOT NULL DEFAULT '',
            whatsapp_url TEXT NOT NULL DEFAULT '',
            sms_url TEXT NOT NULL DEFAULT ''
        )""",
        """CREATE TABLE batmons (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id),
            name TEXT NOT NULL,
            type TEXT NOT NULL,
            token TEXT NOT NULL,
            update_period INTEGER NOT NULL,
            voltage REAL NOT NULL DEFAULT 0,
            current REAL NOT NULL DEFAULT 0,
            power REAL NOT NULL DEFAULT 0,
            soc REAL NOT NULL DEFAULT 0,
            details TEXT NOT NULL DEFAULT '{}',
            created REAL NOT NULL,
            last_reading REAL,
            status TEXT NOT NULL DEFAULT 'Offline',
            notification_enabled INTEGER NOT NULL DEFAULT 1,
            whatsapp_enabled INTEGER NOT NULL DEFAULT 0,
            sms_enabled INTEGER NOT NULL DEFAULT 0,
            voltage_units TEXT NOT NULL DEFAULT '',
            current_units TEXT NOT NULL DEFAULT '',
            power_units TEXT NOT NULL DEFAULT '',
            soc_units TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX batmons_user ON batmons(user_id)",
        """CREATE TABLE readings (
            id INTEGER PRIMARY KEY,
            batmon_id INTEGER NOT NULL,
            ts REAL NOT NULL,
            voltage REAL,
            current REAL,
            power REAL,
            soc REAL,
            details TEXT
        )""",
        "CREATE INDEX readings_batmon_ts ON readings(batmon_id, ts)",
        """CREATE TABLE alarms (
            id INTEGER PRIMARY KEY,
            batmon_id INTEGER NOT NULL,
            name TEXT NOT NULL,
            metric TEXT NOT NULL,
            condition TEXT NOT NULL,
            threshold REAL NOT NULL,
            repeat_delay INTEGER NOT NULL,
            enabled INTEGER NOT NULL,
            triggered INTEGER NOT NULL DEFAULT 0,
            trigger_time REAL,
            akn REAL,
            last_notice REAL,
            update_time REAL NOT NULL
        )""",
        "CREATE INDEX alarms_batmon ON alarms(batmon_id)",
        # Ids are never reused: a deleted batmon's or alarm's id stays here.
        "CREATE TABLE retired_ids (id INTEGER PRIMARY KEY)",
    ],
    # 2: the notification outbox (one row per notice and channel) and its attempts.
    [
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL,
            batmon_id INTEGER NOT NULL,
            channel TEXT NOT NULL CHECK (channel IN ('email', 'whatsapp', 'sms')),
            kind TEXT NOT NULL,
            title TEXT NOT NULL,
            body TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('queued', 'sending', 'sent', 'failed', 'skipped')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            last_error TEXT NOT NULL DEFAULT '',
            target TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL,
            sent_at REAL
        )""",
        "CREATE INDEX outbox_due ON outbox(state, next_attempt_at)",
        "CREATE INDEX outbox_batmon ON outbox(batmon_id, id)",
        """CREATE TABLE outbox_attempts (
            id INTEGER PRIMARY KEY,
            outbox_id INTEGER NOT NULL REFERENCES outbox(id) ON DELETE CASCADE,
            at REAL NOT NULL,
            outcome TEXT NOT NULL,
            error TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX outbox_attempts_notice ON outbox_attempts(outbox_id)",
    ],
    # 3: readings clustered by (batmon_id, ts, seq), so one batmon's range is contiguous
    # on disk (measured: a day of one batmon among 5 M rows reads ~40 % faster, file 30 %
    # smaller, inserts cost the same); plus hourly rollups that outlive retention.
    # The writer's INSERT (batmon_id, ts, voltage, current, power, soc, details) stays as
    # it was: seq defaults to 0, and the trigger keeps readings that share a ts in arrival
    # order by moving the older ones to lower seqs first (through a disjoint range, so no
    # step can collide whatever order SQLite updates them in). Old rows keep their order.
    [
        """CREATE TABLE readings_clustered (
            batmon_id INTEGER NOT NULL,
            ts REAL NOT NULL,
            seq INTEGER NOT NULL DEFAULT 0,
            voltage REAL,
            current REAL,
            power REAL,
            soc REAL,
            details TEXT,
            PRIMARY KEY (batmon_id, ts, seq)
        ) WITHOUT ROWID""",
        """INSERT INTO readings_clustered
               (batmon_id, ts, seq, voltage, current, power, soc, details)
           SELECT batmon_id, ts,
                  1 - ROW_NUMBER() OVER (PARTITION BY batmon_id, ts ORDER BY id DESC),
                  voltage, current, power, soc, details
           FROM readings""",
        "DROP TABLE readings",
        "ALTER TABLE readings_clustered RENAME TO readings",
        """CREATE TRIGGER readings_arrival_order BEFORE INSERT ON readings
           WHEN EXISTS (SELECT 1 FROM readings WHERE batmon_id = NEW.batmon_id AND ts = NEW.ts)
           BEGIN
               UPDATE readings SET seq = seq + 1099511627776
                   WHERE batmon_id = NEW.batmon_id AND ts = NEW.ts;
               UPDATE readings SET seq = seq - 1099511627777
                   WHERE batmon_id = NEW.batmon_id AND ts = NEW.ts;
           END""",
        # One row per batmon and hour: mergeable aggregates (sum and count, not avg), so
        # pruning can fold rows in batch by batch, late arrivals included.
        """CREATE TABLE rollups (
            batmon_id INTEGER NOT NULL,
            hour INTEGER NOT NULL,
            count INTEGER NOT NULL,
            voltage_min REAL, voltage_max REAL, voltage_sum REAL NOT NULL, voltage_count INTEGER NOT NULL,
            current_min REAL, current_max REAL, current_sum REAL NOT NULL, current_count INTEGER NOT NULL,
            power_min REAL, power_max REAL, power_sum REAL NOT NULL, power_count INTEGER NOT NULL,
            soc_min REAL, soc_max REAL, soc_sum REAL NOT NULL, soc_count INTEGER NOT NULL,
            PRIMARY KEY (batmon_id, hour)
        ) WITHOUT ROWID""",
    ],
    # 4: battery banks (several batmons of one user shown as one battery), and the
    # capacity a user may set on a batmon (it weighs the batmon's SoC in a bank).
    # A deleted batmon leaves its banks by the cascade; a bank's members keep their order.
    [
        "ALTER TABLE batmons ADD COLUMN capacity_ah REAL",
        """CREATE TABLE banks (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id),
            name TEXT NOT NULL,
            created REAL NOT NULL
        )""",
        "CREATE INDEX banks_user ON banks(user_id)",
        """CREATE TABLE bank_members (
            bank_id INTEGER NOT NULL REFERENCES banks(id) ON DELETE CASCADE,
            batmon_id INTEGER NOT NULL REFERENCES batmons(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            PRIMARY KEY (bank_id, batmon_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX bank_members_batmon ON bank_members(batmon_id)",
    ],
    # 5: MQTT-only secrets a user makes for Home Assistant (stored hashed, like api keys),
    # and a counter that every change of a credential bumps, by trigger, whichever process
    # makes it: a running server polls this one row to notice `batmon user ...` commands.
    [
        """CREATE TABLE user_tokens (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id),
            name TEXT NOT NULL,
            secret_hash TEXT NOT NULL UNIQUE,
            created REAL NOT NULL,
            UNIQUE (user_id, name)
        )""",
        """CREATE TABLE credentials_version (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            version INTEGER NOT NULL
        )""",
        "INSERT INTO credentials_version (id, version) VALUES (1, 0)",
        *(
            f"""CREATE TRIGGER credentials_changed_{name} AFTER {change}
               BEGIN UPDATE credentials_version SET version = version + 1 WHERE id = 1; END"""
            for name, change in (
                ("user_added", "INSERT ON users"),
                ("user_key", "UPDATE OF email, api_key_hash ON users"),
                ("user_removed", "DELETE ON users"),
                ("token_added", "INSERT ON user_tokens"),
                ("token_changed", "UPDATE ON user_tokens"),
                ("token_removed", "DELETE ON user_tokens"),
            )
        ),
    ],
    # 6: a deleted batmon's readings and rollups are purged in chunks after its row is gone;
    # this mark says whose, so a purge cut by a restart resumes (bridge/store/db.py).
    # And a reading written again (same batmon, ts and values: a redelivery after a lost
    # ack) is stored once: the arrival-order trigger, which already looks for rows of the
    # same ts, drops the insert when one has the same values (RAISE(IGNORE) ends the
    # INSERT of that row only), so the common case (a new ts) costs no extra seek.
    [
        "CREATE TABLE deleted_batmons (batmon_id INTEGER PRIMARY KEY, deleted_at REAL NOT NULL)",
        "DROP TRIGGER readings_arrival_order",
        """CREATE TRIGGER readings_arrival_order BEFORE INSERT ON readings
           WHEN EXISTS (SELECT 1 FROM readings WHERE batmon_id = NEW.batmon_id AND ts = NEW.ts)
           BEGIN
               SELECT RAISE(IGNORE) WHERE EXISTS (SELECT 1 FROM readings
                   WHERE batmon_id = NEW.batmon_id AND ts = NEW.ts AND voltage IS NEW.voltage
                   AND current IS NEW.current AND power IS NEW.power AND soc IS NEW.soc
                   AND details IS NEW.details);
               UPDATE readings SET seq = seq + 1099511627776
                   WHERE batmon_id = NEW.batmon_id AND ts = NEW.ts;
               UPDATE readings SET seq = seq - 1099511627777
                   WHERE batmon_id = NEW.batmon_id AND ts = NEW.ts;
           END""",
    ],
    # 7: energy counters (docs/BATTERY.md). Each batmon keeps its counters and what the
    # integration needs next, written by the writer in the same transaction as the
    # reading (so kill -9 never splits them); each reading keeps the kWh it added, so
    # buckets sum energy per hour or day; rollups keep those sums past retention.
    [
        "ALTER TABLE batmons ADD COLUMN energy_charged_kwh REAL NOT NULL DEFAULT 0",
        "ALTER TABLE batmons ADD COLUMN energy_discharged_kwh REAL NOT NULL DEFAULT 0",
        "ALTER TABLE batmons ADD COLUMN energy_point_ts REAL",
        "ALTER TABLE batmons ADD COLUMN energy_point_power REAL",
        "ALTER TABLE batmons ADD COLUMN device_charged_kwh REAL",
        "ALTER TABLE batmons ADD COLUMN device_discharged_kwh REAL",
        "ALTER TABLE readings ADD COLUMN charged_kwh REAL",
        "ALTER TABLE readings ADD COLUMN discharged_kwh REAL",
        "ALTER TABLE rollups ADD COLUMN charged_kwh_sum REAL NOT NULL DEFAULT 0",
        "ALTER TABLE rollups ADD COLUMN discharged_kwh_sum REAL NOT NULL DEFAULT 0",
        # alarms on battery values may have hysteresis: the value that clears them
        "ALTER TABLE alarms ADD COLUMN clear_value REAL",
    ],
    # 8: an alarm is on one batmon or on one bank (docs/BANKS.md), never both: batmon_id
    # becomes nullable beside a new bank_id, which needs the table made again (SQLite
    # cannot drop a NOT NULL). A bank's alarms go with it (the cascade, and delete_bank).
    [
        """CREATE TABLE alarms_v8 (
            id INTEGER PRIMARY KEY,
            batmon_id INTEGER,
            bank_id INTEGER REFERENCES banks(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            metric TEXT NOT NULL,
            condition TEXT NOT NULL,
            threshold REAL NOT NULL,
            repeat_delay INTEGER NOT NULL,
            enabled INTEGER NOT NULL,
            triggered INTEGER NOT NULL DEFAULT 0,
            trigger_time REAL,
            akn REAL,
            last_notice REAL,
            update_time REAL NOT NULL,
            clear_value REAL,
            CHECK ((batmon_id IS NULL) <> (bank_id IS NULL))
        )""",
        """INSERT INTO alarms_v8 (id, batmon_id, name, metric, condition, threshold, repeat_delay,
               enabled, triggered, trigger_time, akn, last_notice, update_time, clear_value)
           SELECT id, batmon_id, name, metric, condition, threshold, repeat_delay, enabled,
               triggered, trigger_time, akn, last_notice, update_time, clear_value FROM alarms""",
        "DROP TABLE alarms",
        "ALTER TABLE alarms_v8 RENAME TO alarms",
        "CREATE INDEX alarms_batmon ON alarms(batmon_id)",
        "CREATE INDEX alarms_bank ON alarms(bank_id)",
    ],
]

LATEST = len(MIGRATIONS)


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer release than this one."""


def migrate(db: Database) -> int:
    """Bring the database to the latest schema; return the version it is at."""
    conn = db.conn
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    current = row[0] or 0
    if current > LATEST:
        raise SchemaTooNewError(
            f"database schema version {current} is newer than this release knows ({LATEST});"
            " upgrade batmon to use it"
        )
    for version in range(current + 1, LATEST + 1):
        with db.atomic():
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    return LATEST
