import Foundation
import QuiesceCore
import QuiesceSQLite

extension SQLiteWriter {
    /// Checks the database in a copy of the snapshot set against the marker recorded at freeze:
    /// no hot journal (the snapshot would have caught a write mid-commit), `PRAGMA integrity_check`
    /// is `ok`, `page_count` and `journal_mode` match, and the marker query returns the recorded value.
    ///
    /// Opens the copy read-write (SQLite replays its WAL): in place when the copy is writable,
    /// otherwise on a private temporary copy of the database and its `-wal`, removed afterwards.
    /// Never touches the live database.
    public func verify(copy: CopyLayout, marker: ConsistencyMarker) async throws -> VerifyReport {
        try await runBlocking { [self] in try verifyCopy(copy, marker: marker, temporaryCopy: nil) }
    }

    /// `temporaryCopy`: nil decides by whether the copy is writable; true or false forces it (tests).
    func verifyCopy(_ copy: CopyLayout, marker: ConsistencyMarker, temporaryCopy: Bool?) throws -> VerifyReport {
        var checks = VerifyChecks()
        let live = marker[Self.databaseKey] ?? database
        guard let path = copy.translate(live) else {
            checks.fail("\(live) is on no volume of the copy (copied mounts: \(copy.mounts.keys.sorted().joined(separator: ", ")))")
            return checks.report
        }
        guard Self.fileExists(path) else {
            checks.fail("the copy has no database at \(path)")
            return checks.report
        }

        // Before SQLite opens it: SQLite would roll a hot journal back and hide it.
        switch Self.journalHeader(path + "-journal") {
        case .none: checks.pass("no hot journal beside \(path)")
        case .cold: checks.pass("\(path)-journal is not hot (its header is zero)")
        case .hot:
            checks.fail("\(path)-journal is a hot journal: the snapshot caught a write in the middle of its commit, "
                        + "so the write lock was not held when it was taken")
            return checks.report
        case .unreadable(let reason):
            checks.fail("cannot read \(path)-journal: \(reason)")
            return checks.report
        }

        // A truncated file reads as zeros past its end, which integrity_check can miss in a
        // small database: the header says how many pages the file holds at least. Not with a
        // WAL that has frames: a checkpoint copying pages back may have written page 1 (and
        // its count) before the last pages, which the WAL still holds.
        if !Self.hasWALFrames(path + "-wal"), let shortfall = Self.truncation(path) {
            checks.fail(shortfall)
            return checks.report
        }

        var workPath = path
        var temporaryDirectory: String?
        defer { if let temporaryDirectory { try? FileManager.default.removeItem(atPath: temporaryDirectory) } }
        if temporaryCopy ?? !Self.isWritable(path) {
            do {
                let directory = try Self.makeTemporaryDirectory()
                temporaryDirectory = directory
                workPath = directory + "/" + (path as NSString).lastPathComponent
                try FileManager.default.copyItem(atPath: path, toPath: workPath)
                if Self.fileExists(path + "-wal") {
                    try FileManager.default.copyItem(atPath: path + "-wal", toPath: workPath + "-wal")
                }
                checks.pass("the copy is read-only: checked a private copy of the database and its -wal")
            } catch {
                throw WriterError(.retryable, "cannot copy \(path) to a temporary directory to verify it: \(error)",
                                  hint: "free space in \(FileManager.default.temporaryDirectory.path) or set TMPDIR")
            }
        }

        let connection: SQLiteConnection
        do {
            connection = try SQLiteConnection(path: workPath, mode: .readWrite, busyTimeout: .seconds(5))
        } catch {
            checks.fail("cannot open the copy \(workPath): \(error)")
            return checks.report
        }
        defer { connection.close() }

        do {
            let rows = try connection.query("PRAGMA integrity_check", limit: 10)
            let lines = rows.compactMap { $0.first?.text }
            if lines == ["ok"] {
                checks.pass("PRAGMA integrity_check: ok")
            } else {
                checks.fail("PRAGMA integrity_check: " + lines.joined(separator: "; "))
                return checks.report
            }
        } catch {
            checks.fail("PRAGMA integrity_check failed: \(error)")
            return checks.report
        }

        do {
            for (key, pragma) in [(Self.pageCountKey, "PRAGMA page_count"), (Self.journalModeKey, "PRAGMA journal_mode")] {
                let found = try connection.scalar(pragma)?.description ?? "?"
                guard let expected = marker[key] else {
                    checks.pass("\(key): \(found) (no value recorded at freeze)")
                    continue
                }
                if found == expected {
                    checks.pass("\(key): \(found), as at freeze")
                } else {
                    checks.fail("\(key): \(found) in the copy, but \(expected) at freeze")
                }
            }
        } catch {
            checks.fail("reading the copy's page_count and journal_mode failed: \(error)")
            return checks.report
        }

        // The query the marker was computed with (the spec may have changed since).
        if let query = marker[Self.markerQueryKey] ?? markerQuery {
            if let configured = markerQuery, configured != query {
                checks.pass("marker_query changed since the checkpoint: checking the one recorded at freeze")
            }
            guard let expected = marker[Self.markerResultKey] else {
                checks.fail("marker_query \"\(query)\": no value was recorded at freeze to compare with")
                return checks.report
            }
            do {
                if let problem = try MarkerQuery.problem(query, on: connection) {
                    checks.fail("marker_query \"\(query)\" \(problem)")
                    return checks.report
                }
                let found = try markerValue(query, on: connection)
                if found == expected {
                    checks.pass("marker_query \"\(query)\": \(found), as at freeze")
                } else {
                    checks.fail("marker_query \"\(query)\": \(found) in the copy, but \(expected) at freeze")
                }
            } catch {
                checks.fail("marker_query \"\(query)\" failed on the copy: \(error)")
            }
        }
        return checks.report
    }

    enum JournalState: Equatable {
        case none, cold, hot
        case unreadable(String)
    }

    /// A rollback journal is hot when it exists and its header is not zeroed (a committing
    /// writer's journal; DELETE mode removes it, TRUNCATE empties it, PERSIST zeroes the header).
    static func journalHeader(_ path: String) -> JournalState {
        guard fileExists(path) else { return .none }
        guard let handle = FileHandle(forReadingAtPath: path) else {
            return .unreadable(String(cString: strerror(errno)))
        }
        defer { try? handle.close() }
        do {
            let header = try handle.read(upToCount: 28) ?? Data()
            return header.contains { $0 != 0 } ? .hot : .cold
        } catch {
            return .unreadable("\(error)")
        }
    }

    /// Whether SQLite can open `path` read-write and recover it in place (false on a read-only mount).
    static func isWritable(_ path: String) -> Bool {
        let directory = (path as NSString).deletingLastPathComponent
        guard access(directory, W_OK) == 0, access(path, W_OK) == 0 else { return false }
        return [path + "-wal", path + "-shm"].allSatisfy { !fileExists($0) || access($0, W_OK) == 0 }
    }

    static func makeTemporaryDirectory() throws -> String {
        var template = Array((FileManager.default.temporaryDirectory.path + "/quiesce-verify-XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!).map { String(cString: $0) } }) else {
            throw POSIXFailure("mkdtemp in \(FileManager.default.temporaryDirectory.path)", errno)
        }
        return made
    }

    /// A reason if the database file is shorter than its header's page count says (bytes
    /// 16–17 page size, 28–31 the in-header database size, valid when the change counter at
    /// 24–27 equals the version-valid-for number at 92–95), nil when it is not.
    static func hasWALFrames(_ path: String) -> Bool {
        var info = stat()
        // A WAL header is 32 bytes; any frame makes it longer.
        return stat(path, &info) == 0 && info.st_size > 32
    }

    static func truncation(_ path: String) -> String? {
        guard let handle = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? handle.close() }
        guard let header = try? handle.read(upToCount: 100), header.count == 100 else {
            return "\(path) is shorter than a SQLite header (truncated)"
        }
        let bytes = [UInt8](header)
        func u32(_ at: Int) -> UInt32 { bytes[at..<at + 4].reduce(0) { $0 << 8 | UInt32($1) } }
        let rawPageSize = UInt32(bytes[16]) << 8 | UInt32(bytes[17])
        let pageSize = rawPageSize == 1 ? 65536 : UInt64(rawPageSize)
        let pages = UInt64(u32(28))
        guard pageSize >= 512, pages > 0, u32(24) == u32(92) else { return nil }
        guard let size = try? handle.seekToEnd(), size < pages * pageSize else { return nil }
        return "\(path) holds \(size) bytes, but its header counts \(pages) pages of \(pageSize) bytes (\(pages * pageSize)): the file is truncated"
    }
}
