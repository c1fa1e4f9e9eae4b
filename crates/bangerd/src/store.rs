//! The SQLite store at `<state>/banger.db`: images, kernels and VMs, behind ordered
//! migrations recorded in `schema_migrations`, each applied in its own transaction.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};

/// One schema step. Versions are consecutive from 1 and never edited once released.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number.
    pub version: i64,
    /// What it does, recorded alongside.
    pub name: &'static str,
    /// The SQL, run as one batch inside a transaction.
    pub sql: &'static str,
}

/// The schema this binary knows.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "images",
        sql: "CREATE TABLE images (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            reference TEXT NOT NULL,
            manifest_digest TEXT NOT NULL,
            config_digest TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            created_at TEXT NOT NULL
          );",
    },
    Migration {
        version: 2,
        name: "kernels and vms",
        sql: "CREATE TABLE kernels (
            name TEXT PRIMARY KEY,
            version TEXT NOT NULL,
            created_at TEXT NOT NULL
          );
          CREATE TABLE vms (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            image TEXT NOT NULL,
            kernel TEXT NOT NULL REFERENCES kernels(name),
            vcpus INTEGER NOT NULL,
            memory_mib INTEGER NOT NULL,
            disk_bytes INTEGER NOT NULL,
            state TEXT NOT NULL,
            pid INTEGER,
            backend TEXT NOT NULL,
            created_at TEXT NOT NULL
          );",
    },
    Migration {
        version: 3,
        name: "vm networking",
        // Rows from before TAP networking used QEMU's user-mode stack. The unique index
        // makes a double allocation of one address impossible (NULLs do not collide).
        sql: "ALTER TABLE vms ADD COLUMN network TEXT NOT NULL DEFAULT 'user';
          ALTER TABLE vms ADD COLUMN guest_ip TEXT;
          ALTER TABLE vms ADD COLUMN tap TEXT;
          CREATE UNIQUE INDEX vms_guest_ip ON vms(guest_ip);",
    },
    Migration {
        version: 4,
        name: "kernel initrd",
        // Every kernel before this booted banger's own initramfs.
        sql: "ALTER TABLE kernels ADD COLUMN initrd TEXT NOT NULL DEFAULT 'banger';",
    },
    Migration {
        version: 5,
        name: "vmm identity",
        // `<boot id>:<start time>` of the VMM (see services::process): a bare pid may have
        // been reused by the time the daemon looks at it again. Rows from before have
        // none, and their VMM is recognised by its command line instead.
        sql: "ALTER TABLE vms ADD COLUMN pid_identity TEXT;",
    },
    Migration {
        version: 6,
        name: "vm egress",
        // JSON of banger_api::Egress; VMs from before the setting let everything out.
        sql: "ALTER TABLE vms ADD COLUMN egress TEXT NOT NULL DEFAULT '\"allow\"';",
    },
    Migration {
        version: 7,
        name: "vm published ports",
        // JSON list of banger_api::PublishedPort; VMs from before publish nothing.
        sql: "ALTER TABLE vms ADD COLUMN ports TEXT NOT NULL DEFAULT '[]';",
    },
];

/// The database was written by a newer banger; refusing beats corrupting it.
#[derive(Debug, thiserror::Error)]
#[error(
    "database schema version {found} is newer than this bangerd knows ({known}); upgrade banger"
)]
pub struct NewerSchema {
    /// Version in the database.
    pub found: i64,
    /// Highest version this binary has.
    pub known: i64,
}

/// The open database.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        Self::open_with(path, MIGRATIONS)
    }

    /// [`Store::open`] with a given migration list (tests use their own).
    pub fn open_with(path: &Path, migrations: &[Migration]) -> anyhow::Result<Store> {
        let mut conn =
            Connection::open(path).with_context(|| format!("open database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .context("enable WAL journal")?;
        conn.pragma_update(None, "foreign_keys", true)
            .context("enable foreign keys")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .context("set busy timeout")?;
        migrate(&mut conn, migrations)
            .with_context(|| format!("migrate database {}", path.display()))?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// The connection, for services' queries. Calls are short; blocking is acceptable.
    pub fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The one text column `sql` selects, every row of it; a failure says it was trying
    /// to `what` (e.g. `list image ids`).
    pub fn strings(
        &self,
        what: &str,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> anyhow::Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql).with_context(|| what.to_owned())?;
        let rows = stmt
            .query_map(params, |row| row.get(0))
            .with_context(|| what.to_owned())?;
        rows.collect::<Result<_, _>>()
            .with_context(|| what.to_owned())
    }

    /// The one row `sql` selects, read by `row`, or `None` when there is none; a failure
    /// says it was trying to `what` (e.g. `look up image`).
    pub fn optional_row<T>(
        &self,
        what: &str,
        sql: &str,
        params: impl rusqlite::Params,
        row: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> anyhow::Result<Option<T>> {
        self.conn()
            .query_row(sql, params, row)
            .optional()
            .with_context(|| what.to_owned())
    }

    /// The schema version in the database.
    pub fn schema_version(&self) -> anyhow::Result<i64> {
        current_version(&self.conn())
    }
}

fn current_version(conn: &Connection) -> anyhow::Result<i64> {
    let version: Option<i64> = conn
        .query_row("SELECT MAX(version) FROM schema_migrations", [], |row| {
            row.get(0)
        })
        .optional()
        .context("read schema version")?
        .flatten();
    Ok(version.unwrap_or(0))
}

fn migrate(conn: &mut Connection, migrations: &[Migration]) -> anyhow::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
         );",
    )
    .context("create schema_migrations")?;
    let known = migrations.last().map_or(0, |m| m.version);
    let found = current_version(conn)?;
    if found > known {
        return Err(NewerSchema { found, known }.into());
    }
    for migration in migrations.iter().filter(|m| m.version > found) {
        let tx = conn.transaction().context("begin migration")?;
        tx.execute_batch(migration.sql).with_context(|| {
            format!("apply migration {} ({})", migration.version, migration.name)
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (?1, ?2)",
            params![migration.version, migration.name],
        )
        .context("record migration")?;
        tx.commit()
            .with_context(|| format!("commit migration {}", migration.version))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_exists(store: &Store, name: &str) -> bool {
        store
            .conn()
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?1",
                [name],
                |_| Ok(()),
            )
            .optional()
            .unwrap()
            .is_some()
    }

    #[test]
    fn fresh_database_gets_every_migration_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.schema_version().unwrap(),
            MIGRATIONS.last().unwrap().version
        );
        assert!(table_exists(&store, "images"));
        drop(store);
        let store = Store::open(&path).unwrap();
        let rows: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, MIGRATIONS.len() as i64);
    }

    #[test]
    fn vm_rows_from_before_networking_read_as_user_networked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        let store = Store::open_with(&path, &MIGRATIONS[..2]).unwrap();
        store
            .conn()
            .execute_batch(
                "INSERT INTO kernels VALUES ('k', '6.1', 'now');
                 INSERT INTO vms VALUES ('id1', 'old', 'img', 'k', 1, 512, 1, 'stopped', NULL, 'qemu-tcg', 'now');",
            )
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let (network, ip, tap): (String, Option<String>, Option<String>) = store
            .conn()
            .query_row("SELECT network, guest_ip, tap FROM vms", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((network.as_str(), ip, tap), ("user", None, None));
        let initrd: String = store
            .conn()
            .query_row("SELECT initrd FROM kernels", [], |r| r.get(0))
            .unwrap();
        assert_eq!(initrd, "banger", "an old kernel boots banger's initramfs");
        // One address, one VM.
        let conn = store.conn();
        conn.execute("UPDATE vms SET guest_ip = '172.30.0.2'", [])
            .unwrap();
        let dup = conn.execute(
            "INSERT INTO vms (id, name, image, kernel, vcpus, memory_mib, disk_bytes, state, backend, created_at, guest_ip)
             VALUES ('id2', 'new', 'img', 'k', 1, 512, 1, 'stopped', 'qemu', 'now', '172.30.0.2')",
            [],
        );
        assert!(dup.is_err(), "a second VM got 172.30.0.2");
    }

    #[test]
    fn migrations_apply_in_order_and_only_new_ones_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        let first = [Migration {
            version: 1,
            name: "a",
            sql: "CREATE TABLE a (x INTEGER);",
        }];
        Store::open_with(&path, &first).unwrap();
        let both = [
            first[0],
            Migration {
                version: 2,
                name: "b",
                sql: "INSERT INTO a VALUES (7); CREATE TABLE b (y);",
            },
        ];
        let store = Store::open_with(&path, &both).unwrap();
        assert_eq!(store.schema_version().unwrap(), 2);
        let x: i64 = store
            .conn()
            .query_row("SELECT x FROM a", [], |r| r.get(0))
            .unwrap();
        assert_eq!(x, 7);
    }

    #[test]
    fn failing_migration_rolls_back_whole_and_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        let broken = [
            Migration {
                version: 1,
                name: "ok",
                sql: "CREATE TABLE a (x);",
            },
            Migration {
                version: 2,
                name: "broken",
                sql: "CREATE TABLE c (z); SELEKT nonsense;",
            },
        ];
        let err = format!("{:#}", Store::open_with(&path, &broken).unwrap_err());
        assert!(err.contains("apply migration 2 (broken)"), "{err}");
        let store = Store::open_with(&path, &broken[..1]).unwrap();
        assert_eq!(store.schema_version().unwrap(), 1);
        assert!(!table_exists(&store, "c"), "half of migration 2 survived");
    }

    #[test]
    fn newer_schema_is_refused_as_bad_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        let future = [
            Migration {
                version: 1,
                name: "a",
                sql: "CREATE TABLE a (x);",
            },
            Migration {
                version: 2,
                name: "b",
                sql: "CREATE TABLE b (x);",
            },
        ];
        Store::open_with(&path, &future).unwrap();
        let err = Store::open_with(&path, &future[..1]).unwrap_err();
        assert!(err.chain().any(|e| e.is::<NewerSchema>()));
        assert!(
            format!("{err:#}").contains("schema version 2 is newer than this bangerd knows (1)")
        );
        let service_error = crate::ServiceError::from(err);
        assert_eq!(service_error.kind, banger_api::ErrorKind::BadVersion);
    }
}
