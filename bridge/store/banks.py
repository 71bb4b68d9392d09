"""Named queries for battery banks: the only place bank SQL is written.

Self-contained on purpose: it needs one sqlite-utils ``Database`` (the store's), so it
slots behind whatever store interface holds it. A deleted batmon leaves its banks by
the schema's ``ON DELETE CASCADE`` (migration 4), so deleting a batmon needs no query here.
"""

from __future__ import annotations

from typing import Any

from sqlite_utils import Database


class BankStore:
    """Banks and their ordered members; every method is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add_bank(self, bank_id: int, user_id: int, name: str, created: float,
                 batmon_ids: list[int]) -> None:  # fmt: skip
        """Insert a bank (its id already chosen by ``Store.new_id``) with its members."""
        with self.db.atomic():
            self.db.execute(
                "INSERT INTO banks (id, user_id, name, created) VALUES (?, ?, ?, ?)",
                (bank_id, user_id, name, created),
            )
            self._insert_members(bank_id, batmon_ids)

    def banks(self) -> list[dict[str, Any]]:
        """Every bank, oldest first, each with ``batmon_ids`` in the order they were given."""
        members: dict[int, list[int]] = {}
        for bank_id, batmon_id in self.db.execute(
            "SELECT bank_id, batmon_id FROM bank_members ORDER BY bank_id, position"
        ):
            members.setdefault(bank_id, []).append(batmon_id)
        return [
            {**row, "batmon_ids": members.get(row["id"], [])}
            for row in self.db.query("SELECT id, user_id, name, created FROM banks ORDER BY created, id")
        ]

    def rename_bank(self, bank_id: int, name: str) -> None:
        """Change a bank's name."""
        with self.db.atomic():
            self.db.execute("UPDATE banks SET name = ? WHERE id = ?", (name, bank_id))

    def set_members(self, bank_id: int, batmon_ids: list[int]) -> None:
        """Replace a bank's members (and their order)."""
        with self.db.atomic():
            self.db.execute("DELETE FROM bank_members WHERE bank_id = ?", (bank_id,))
            self._insert_members(bank_id, batmon_ids)

    def delete_bank(self, bank_id: int) -> None:
        """Delete a bank (not its batmons) with its alarms; their ids are never handed out again."""
        with self.db.atomic():
            self.db.execute("INSERT OR IGNORE INTO retired_ids (id) SELECT ? UNION SELECT id FROM alarms"
                            " WHERE bank_id = ?", (bank_id, bank_id))  # fmt: skip
            self.db.execute("DELETE FROM alarms WHERE bank_id = ?", (bank_id,))
            self.db.execute("DELETE FROM bank_members WHERE bank_id = ?", (bank_id,))
            self.db.execute("DELETE FROM banks WHERE id = ?", (bank_id,))

    def _insert_members(self, bank_id: int, batmon_ids: list[int]) -> None:
        self.db.conn.executemany(
            "INSERT INTO bank_members (bank_id, batmon_id, position) VALUES (?, ?, ?)",
            [(bank_id, batmon_id, position) for position, batmon_id in enumerate(batmon_ids)],
        )
