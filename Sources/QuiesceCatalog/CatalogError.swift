import Foundation
import QuiesceSQLite

/// Why the catalog could not be opened, read or changed: the catalog's path, what failed,
/// and what to do about it.
public enum CatalogError: Error, Sendable, CustomStringConvertible {
    /// The catalog's directory does not exist and could not be created.
    case cannotCreateDirectory(path: String, directory: String, reason: String)
    /// The catalog (or its directory, or its `-wal`/`-shm` files) cannot be written.
    case notWritable(path: String, reason: String)
    /// The file is not an SQLite database, is damaged, or is some other program's database.
    case notACatalog(path: String, reason: String)
    /// The catalog was written by a newer quiesce, whose schema this one does not know.
    case newerSchema(path: String, found: Int, supported: Int)
    /// Another process kept the catalog's write lock past the busy timeout.
    case busy(path: String, operation: String)
    /// SQLite failed for another reason (disk full, I/O error, …).
    case storage(path: String, operation: String, reason: String)
    /// No checkpoint with this id is recorded.
    case unknownCheckpoint(path: String, id: String)
    /// The checkpoint is retained for these holders (a DR target's base snapshot) and cannot be deleted.
    case checkpointHeld(path: String, id: String, holders: [String])
    /// The checkpoint is still `running`: its coordinator is at work, or died and was not recovered yet.
    case checkpointRunning(path: String, id: String)
    /// Only a completed checkpoint can be held for retention.
    case notCompleted(path: String, id: String, outcome: String)
    /// The checkpoint id is already recorded (two runs with the same id).
    case duplicateCheckpoint(path: String, id: String)
    /// `recoverInterrupted` was called while no process held the checkpoint lock.
    case lockNotHeld(path: String, lockPath: String)
    /// The checkpoint lock file could not be created, opened or locked.
    case lockFile(lockPath: String, operation: String, reason: String)

    public var description: String {
        switch self {
        case .cannotCreateDirectory(let path, let directory, let reason):
            return "catalog \(path): cannot create its directory \(directory): \(reason)"
                + "\n       (run quiesce as root, or set `catalog` in quiesce.toml to a path under a writable directory)"
        case .notWritable(let path, let reason):
            return "catalog \(path) is not writable: \(reason)"
                + "\n       (run quiesce as root, or fix the ownership of the catalog and its directory"
                + " \((path as NSString).deletingLastPathComponent); the -wal and -shm files beside it must be writable too)"
        case .notACatalog(let path, let reason):
            return "\(path) is not a quiesce catalog: \(reason)"
                + "\n       (point `catalog` in quiesce.toml at another path; if this was the catalog and is damaged,"
                + " move it aside: a new catalog is created, and existing snapshot files stay on the datastore)"
        case .newerSchema(let path, let found, let supported):
            return "catalog \(path) was written by a newer quiesce (schema version \(found); this quiesce knows up to \(supported))"
                + "\n       (upgrade quiesce on this host, or point `catalog` in quiesce.toml at another path)"
        case .busy(let path, let operation):
            return "catalog \(path): \(operation): another process held the catalog's write lock too long"
                + "\n       (look for a stuck quiesce or an open `sqlite3` shell on the catalog: `fuser \(path)`)"
        case .storage(let path, let operation, let reason):
            return "catalog \(path): \(operation) failed: \(reason)"
                + "\n       (check free space and errors on the filesystem holding \((path as NSString).deletingLastPathComponent))"
        case .unknownCheckpoint(let path, let id):
            return "catalog \(path) has no checkpoint \"\(id)\" (see `quiesce checkpoints list`)"
        case .checkpointHeld(let path, let id, let holders):
            return "checkpoint \(id) is held by \(holders.map { "\"\($0)\"" }.joined(separator: ", ")) in catalog \(path):"
                + " a DR target still needs it as the base of its next delta"
                + "\n       (it is released when the target acknowledges a newer checkpoint, or when the target is removed)"
        case .checkpointRunning(let path, let id):
            return "checkpoint \(id) in catalog \(path) is still running"
                + "\n       (wait for it; if its coordinator died, the next `quiesce checkpoint` marks it aborted)"
        case .notCompleted(let path, let id, let outcome):
            return "checkpoint \(id) in catalog \(path) is \(outcome), not completed: only a completed checkpoint can be held"
        case .duplicateCheckpoint(let path, let id):
            return "catalog \(path) already records a checkpoint \"\(id)\""
                + "\n       (two runs got the same id: check that every run takes the checkpoint lock, and the system clock)"
        case .lockNotHeld(let path, let lockPath):
            return "catalog \(path): refusing to recover interrupted checkpoints without the checkpoint lock \(lockPath)"
                + "\n       (a running checkpoint would be marked aborted; take `CheckpointLock.acquire` first)"
        case .lockFile(let lockPath, let operation, let reason):
            return "checkpoint lock \(lockPath): cannot \(operation): \(reason)"
                + "\n       (run quiesce as root, or fix the ownership of \((lockPath as NSString).deletingLastPathComponent))"
        }
    }

    /// Maps an SQLite failure during `operation` to the error an operator can act on.
    static func from(_ error: any Error, path: String, operation: String) -> CatalogError {
        if let error = error as? CatalogError { return error }
        guard let error = error as? SQLiteError else {
            return .storage(path: path, operation: operation, reason: "\(error)")
        }
        switch error.code & 0xff {
        case 5, 6: // SQLITE_BUSY, SQLITE_LOCKED
            return .busy(path: path, operation: operation)
        case 3, 8, 14, 23: // SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_AUTH
            return .notWritable(path: path, reason: "\(error.message) (SQLite code \(error.code))")
        case 11, 26: // SQLITE_CORRUPT, SQLITE_NOTADB
            return .notACatalog(path: path, reason: "\(error.message) (SQLite code \(error.code))")
        default:
            return .storage(path: path, operation: operation, reason: "\(error.message) (SQLite code \(error.code))")
        }
    }
}
