import Foundation
import Synchronization

/// One checkpoint at a time per catalog: an exclusive `flock` on `<catalog>.lock`; and, apart
/// from it, one replication at a time (`<catalog>.replicate.lock`), so that an overlapping cron
/// run says so instead of colliding with the running one at the receivers.
///
/// The kernel drops the lock when the holder's process dies (even `kill -9`), so a lock is
/// never stale; the file's contents (pid, start time, holder) only describe the current
/// holder. The descriptor is close-on-exec: a daemon a writer starts never inherits the lock.
///
/// flock locks belong to an open file description, so a second `acquire` in the same
/// process fails like one from another process.
public final class CheckpointLock: Sendable {
    /// The lock file, `<catalog>.lock`.
    public let path: String
    /// What the holder said it is doing (`quiesce checkpoint --label nightly`).
    public let holder: String
    private let descriptor: Mutex<Int32>

    /// What the lock serializes.
    public enum Purpose: String, Sendable {
        case checkpoint
        case replication

        var suffix: String { self == .checkpoint ? ".lock" : ".replicate.lock" }
    }

    private init(path: String, holder: String, descriptor: Int32) {
        self.path = path
        self.holder = holder
        self.descriptor = Mutex(descriptor)
    }

    deinit { release() }

    /// Another process (or another `CheckpointLock` of this one) holds the lock.
    /// The CLI exits 75 (EX_TEMPFAIL) on it: cron may simply try again later.
    public struct Held: Error, Sendable, CustomStringConvertible {
        /// The lock file.
        public var lockPath: String
        public var purpose: Purpose = .checkpoint
        /// What the holder wrote into the lock file; nil if it had not written it yet
        /// or is not a quiesce process.
        public var pid: Int32?
        public var since: Date?
        public var holder: String?

        public var description: String {
            var text = "another \(purpose.rawValue) is running:"
            text += pid.map { " pid \($0)" } ?? " holder unknown"
            if let since { text += " since \(formatSince(since))" }
            if let holder, !holder.isEmpty { text += " (\(holder))" }
            return text + ", lock \(lockPath)"
        }
    }

    /// The lock file of the catalog at `catalogPath`.
    public static func lockPath(forCatalog catalogPath: String, purpose: Purpose = .checkpoint) -> String {
        catalogPath + purpose.suffix
    }

    /// `acquire`, retried every 200 ms while someone holds the lock, for at most `limit`.
    public static func acquire(catalogPath: String, holder: String, purpose: Purpose,
                               waitingUpTo limit: Duration) throws -> CheckpointLock {
        let deadline = ContinuousClock.now + limit
        while true {
            do {
                return try acquire(catalogPath: catalogPath, holder: holder, purpose: purpose)
            } catch is Held where ContinuousClock.now < deadline {
                Thread.sleep(forTimeInterval: 0.2)
            }
        }
    }

    /// Takes the checkpoint lock of the catalog at `catalogPath` without waiting, creating
    /// the lock file (0600) and its directory (0700) if needed, and writes this process's
    /// pid, the time and `holder` into it.
    ///
    /// Throws `Held` if someone holds it, `CatalogError` if the file cannot be created or locked.
    public static func acquire(catalogPath: String, holder: String, purpose: Purpose = .checkpoint) throws -> CheckpointLock {
        let path = lockPath(forCatalog: catalogPath, purpose: purpose)
        if let failure = createDirectories(parentDirectory(of: path)) {
            throw CatalogError.lockFile(lockPath: path, operation: "create its directory", reason: failure)
        }
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else {
            throw CatalogError.lockFile(lockPath: path, operation: "open", reason: String(cString: strerror(errno)))
        }
        var rc: Int32
        repeat { rc = flock(fd, LOCK_EX | LOCK_NB) } while rc != 0 && errno == EINTR
        if rc != 0 {
            let code = errno
            defer { close(fd) }
            if code == EWOULDBLOCK {
                var held = readHolder(fd, path: path)
                held.purpose = purpose
                throw held
            }
            throw CatalogError.lockFile(lockPath: path, operation: "lock", reason: String(cString: strerror(code)))
        }
        let line = holder.split(whereSeparator: \.isNewline).joined(separator: " ")
        let text = "pid \(getpid())\nsince \(formatSince(Date()))\nholder \(line)\n"
        let bytes = Array(text.utf8)
        let written = ftruncate(fd, 0) == 0 ? bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) } : -1
        guard written == bytes.count else {
            let reason = String(cString: strerror(errno))
            flock(fd, LOCK_UN)
            close(fd)
            throw CatalogError.lockFile(lockPath: path, operation: "write the holder into it", reason: reason)
        }
        return CheckpointLock(path: path, holder: line, descriptor: fd)
    }

    /// Gives the lock up (idempotent; also done on deinit and by the kernel when the process dies).
    public func release() {
        descriptor.withLock { fd in
            guard fd >= 0 else { return }
            _ = ftruncate(fd, 0) // the file no longer names a holder
            flock(fd, LOCK_UN)
            close(fd)
            fd = -1
        }
    }

    /// What the holder wrote. It writes right after locking: give it a moment if the file is still empty.
    private static func readHolder(_ fd: Int32, path: String) -> Held {
        var held = Held(lockPath: path)
        for attempt in 0..<20 {
            var buffer = [UInt8](repeating: 0, count: 4096)
            let count = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
            let text = count > 0 ? String(decoding: buffer[0..<count], as: UTF8.self) : ""
            for line in text.split(separator: "\n") {
                let parts = line.split(separator: " ", maxSplits: 1)
                guard parts.count == 2 else { continue }
                let value = String(parts[1])
                switch parts[0] {
                case "pid": held.pid = Int32(value)
                case "since": held.since = try? Date(value, strategy: .iso8601)
                case "holder": held.holder = value
                default: break
                }
            }
            if held.pid != nil || attempt == 19 { break }
            usleep(10_000)
        }
        // Words left by a holder that died: the process holding the lock now is not a quiesce
        // that wrote the file (e.g. an operator's `flock`).
        if let pid = held.pid, kill(pid, 0) != 0, errno == ESRCH {
            return Held(lockPath: path)
        }
        return held
    }
}

extension CheckpointLock.Held {
    init(lockPath: String) { self.lockPath = lockPath }
}

/// `2026-11-25T12:00:00Z`.
private func formatSince(_ date: Date) -> String {
    date.formatted(.iso8601)
}
