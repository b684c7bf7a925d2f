import QuiesceSQLite

/// The catalog's tables, versioned with `PRAGMA user_version`.
///
/// Times are unix milliseconds (UTC) in INTEGER columns; markers and recovery metadata are
/// JSON objects (`{"lsn":"0/3000060"}`), so `sqlite3 catalog.db` with `json_extract` can read them.
/// A new version appends a step to `migrations`; a catalog newer than the last step is refused.
enum CatalogSchema {
    /// 'QUIE': tells a quiesce catalog from any other SQLite database.
    static let applicationID: Int64 = 0x5155_4945

    static var version: Int { migrations.count }

    /// `migrations[n]` takes a catalog from version n to n + 1.
    static let migrations: [String] = [
        """
        CREATE TABLE checkpoints (
            seq              INTEGER PRIMARY KEY,
            id               TEXT NOT NULL UNIQUE,
            label            TEXT,
            started_at       INTEGER NOT NULL,
            ended_at         INTEGER,
            outcome          TEXT NOT NULL CHECK (outcome IN ('running', 'completed', 'aborted')),
            failed_phase     TEXT,
            failed_writer    TEXT,
            error            TEXT,
            freeze_window_ms REAL,
            hold_window_ms   REAL
        );
        -- list (newest N) and the order of everything else
        CREATE INDEX checkpoints_by_time ON checkpoints (started_at, id);
        -- prune (completed/aborted by age), latestCompleted, recoverInterrupted (running)
        CREATE INDEX checkpoints_by_outcome ON checkpoints (outcome, started_at, id);

        CREATE TABLE checkpoint_writers (
            checkpoint INTEGER NOT NULL REFERENCES checkpoints (seq) ON DELETE CASCADE,
            position   INTEGER NOT NULL,
            name       TEXT NOT NULL,
            type       TEXT NOT NULL,
            state      TEXT NOT NULL,
            error_kind TEXT NOT NULL,
            error      TEXT,
            marker     TEXT,
            recovery   TEXT,
            PRIMARY KEY (checkpoint, position)
        ) WITHOUT ROWID;

        CREATE TABLE snapshot_files (
            checkpoint INTEGER NOT NULL REFERENCES checkpoints (seq) ON DELETE CASCADE,
            position   INTEGER NOT NULL,
            volume     TEXT NOT NULL,
            image      TEXT NOT NULL,
            path       TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            PRIMARY KEY (checkpoint, position)
        ) WITHOUT ROWID;
        -- latestCompleted(volume:): the base of the next delta of one volume
        CREATE INDEX snapshot_files_by_volume ON snapshot_files (volume, checkpoint);

        CREATE TABLE writer_status (
            name                       TEXT PRIMARY KEY,
            type                       TEXT NOT NULL,
            state                      TEXT NOT NULL,
            last_error_kind            TEXT NOT NULL DEFAULT 'none',
            last_error                 TEXT,
            last_successful_checkpoint TEXT,
            last_checkpoint            TEXT,
            updated_at                 INTEGER NOT NULL
        ) WITHOUT ROWID;

        -- No cascade: a held checkpoint cannot be deleted.
        CREATE TABLE retention_holds (
            checkpoint INTEGER NOT NULL REFERENCES checkpoints (seq),
            holder     TEXT NOT NULL,
            held_since INTEGER NOT NULL,
            PRIMARY KEY (checkpoint, holder)
        ) WITHOUT ROWID;
        CREATE INDEX retention_holds_by_holder ON retention_holds (holder);
        """,
        """
        -- What each DR target has acknowledged, per volume: the base of its next delta.
        CREATE TABLE target_acks (
            target          TEXT NOT NULL,
            volume          TEXT NOT NULL,
            checkpoint_id   TEXT NOT NULL,
            checkpoint_time INTEGER NOT NULL,
            acknowledged_at INTEGER NOT NULL,
            PRIMARY KEY (target, volume)
        ) WITHOUT ROWID;
        """,
        """
        -- Whether the target's receiver verified the acknowledged checkpoint (NULL: it did not try).
        ALTER TABLE target_acks ADD COLUMN verified INTEGER;
        ALTER TABLE target_acks ADD COLUMN verify_failures TEXT;
        """,
        """
        -- The writers' drop-ins as a checkpoint used them (the DR side verifies with these),
        -- each distinct text stored once.
        CREATE TABLE writer_specs (
            id   INTEGER PRIMARY KEY,
            text TEXT NOT NULL UNIQUE
        );
        CREATE TABLE checkpoint_specs (
            checkpoint INTEGER NOT NULL REFERENCES checkpoints(seq),
            name       TEXT NOT NULL,
            spec       INTEGER NOT NULL REFERENCES writer_specs(id),
            PRIMARY KEY (checkpoint, name)
        ) WITHOUT ROWID;
        CREATE INDEX checkpoint_specs_by_spec ON checkpoint_specs(spec);
        """,
    ]

    /// Brings the catalog to `version`, or refuses one that is newer or not ours.
    static func migrate(_ db: SQLiteConnection) throws {
        let path = db.path
        func readVersion() throws -> Int { Int(try db.scalar("PRAGMA user_version")?.int ?? 0) }
        // Cheap check without the write lock: a current catalog opens without writing.
        let seen = try readVersion()
        if seen > version { throw CatalogError.newerSchema(path: path, found: seen, supported: version) }
        if seen == version {
            try checkApplicationID(db)
            return
        }
        try db.transaction {
            let found = try readVersion() // another process may have migrated meanwhile
            if found > version { throw CatalogError.newerSchema(path: path, found: found, supported: version) }
            if found == 0 {
                let foreign = try db.query("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' LIMIT 3")
                if !foreign.isEmpty {
                    let names = foreign.compactMap { $0.first?.text }.joined(separator: ", ")
                    throw CatalogError.notACatalog(path: path, reason: "an SQLite database of another program (it has \(names))")
                }
                try db.execute("PRAGMA application_id = \(applicationID)")
            } else {
                try checkApplicationID(db)
            }
            for step in migrations[found...] { try db.execute(step) }
            try db.execute("PRAGMA user_version = \(version)")
        }
    }

    private static func checkApplicationID(_ db: SQLiteConnection) throws {
        let id = try db.scalar("PRAGMA application_id")?.int ?? 0
        if id != applicationID {
            throw CatalogError.notACatalog(path: db.path,
                                           reason: "an SQLite database of another program (application_id \(id))")
        }
    }
}
