import Foundation
import QuiesceCore

/// Dovecot's dotlock rules (`src/lib/file-dotlock.c`), as far as a short-lived holder needs them.
///
/// - Created with `O_CREAT | O_EXCL` (Dovecot's `dotlock_use_excl = yes`, its default), holding
///   `<pid>:<hostname>` and no newline, readable by the mailbox's owner.
/// - An existing lock is stale, and is removed, when it names a process of this host that no
///   longer exists, or, when it names none (another host, empty, unreadable), when neither it nor
///   the file it protects has changed for the stale timeout (`dovecot-uidlist`: 2 min;
///   mbox: `mbox_dotlock_change_timeout`, 2 min). A live owner is never overridden, however old.
enum Dotlock {
    /// What one attempt found.
    enum Attempt {
        case acquired(HeldDotlock)
        /// Someone else holds it (who, for the error message).
        case busy(holder: String)
        /// A stale lock was removed (why); try again at once.
        case removedStale(String)
    }

    static let hostname: String = {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "localhost" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }()

    /// What we write into our locks.
    static var ownContent: String { "\(getpid()):\(hostname)" }

    /// One attempt at `lockPath`. `owner` is who the lock file should belong to (the mailbox's
    /// owner, so Dovecot running as that user can read and remove it). Blocking.
    static func attempt(_ lockPath: String, protecting protected: String, staleAfter staleSeconds: Int,
                        owner: (uid: uid_t, gid: gid_t, mode: mode_t)) throws -> Attempt {
        let content = ownContent
        let fd = open(lockPath, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, owner.mode)
        if fd >= 0 {
            defer { close(fd) }
            let bytes = Array(content.utf8)
            guard write(fd, bytes, bytes.count) == bytes.count else {
                let code = errno
                unlink(lockPath)
                throw POSIXFailure("write \(lockPath)", code)
            }
            if geteuid() == 0 { _ = fchown(fd, owner.uid, owner.gid) }
            _ = fchmod(fd, owner.mode)
            var info = stat()
            guard fstat(fd, &info) == 0 else {
                let code = errno
                unlink(lockPath)
                throw POSIXFailure("fstat \(lockPath)", code)
            }
            return .acquired(HeldDotlock(path: lockPath, device: UInt64(info.st_dev), inode: UInt64(info.st_ino),
                                         content: content))
        }
        let code = errno
        guard code == EEXIST else { throw POSIXFailure("create \(lockPath)", code) }
        return try judgeExisting(lockPath, protecting: protected, staleAfter: staleSeconds)
    }

    /// Dovecot's `check_lock` for a lock that exists.
    static func judgeExisting(_ lockPath: String, protecting protected: String, staleAfter staleSeconds: Int) throws -> Attempt {
        var info = stat()
        guard lstat(lockPath, &info) == 0 else {
            if errno == ENOENT { return .removedStale("it disappeared") }
            throw POSIXFailure("lstat \(lockPath)", errno)
        }
        let text = readSmall(lockPath) ?? ""
        let now = time(nil)
        // How long this lock file has existed tells one stuck holder from a stream of short ones.
        let age = max(0, now - info.st_mtim.tv_sec)
        if let pid = localPID(text) {
            if kill(pid, 0) == 0 || errno != ESRCH {
                return .busy(holder: "process \(pid)" + (pid == getpid() ? " (this quiesce)" : "") + ", lock \(age) s old")
            }
            // Dead owner: override it, unless it was replaced meanwhile (Dovecot re-checks too).
            var again = stat()
            if lstat(lockPath, &again) == 0, again.st_ino == info.st_ino, again.st_dev == info.st_dev {
                if unlink(lockPath) != 0 && errno != ENOENT { throw POSIXFailure("unlink stale \(lockPath)", errno) }
            }
            return .removedStale("its owner, process \(pid) of this host, is gone")
        }
        // No local pid: stale when nothing changed for the stale timeout.
        var lastChange = Int(info.st_ctim.tv_sec)
        if Int(info.st_mtim.tv_sec) <= now, Int(info.st_mtim.tv_sec) > lastChange { lastChange = Int(info.st_mtim.tv_sec) }
        var target = stat()
        if stat(protected, &target) == 0 {
            lastChange = max(lastChange, min(Int(target.st_mtim.tv_sec), now), Int(target.st_ctim.tv_sec))
        }
        if now > lastChange + staleSeconds {
            if unlink(lockPath) != 0 && errno != ENOENT { throw POSIXFailure("unlink stale \(lockPath)", errno) }
            return .removedStale("it names no live process of this host (\(text.isEmpty ? "empty" : "\"\(text)\"")) "
                                 + "and nothing changed for \(now - lastChange) s (stale after \(staleSeconds) s)")
        }
        return .busy(holder: (text.isEmpty ? "an unnamed holder" : "\"\(text)\"") + ", lock \(age) s old")
    }

    /// `pid` when `text` is `pid:host` for this host.
    static func localPID(_ text: String) -> pid_t? {
        var line = Substring(text)
        if line.hasSuffix("\n") { line = line.dropLast() }
        guard let colon = line.firstIndex(of: ":"), line[line.index(after: colon)...] == hostname,
              let pid = pid_t(line[..<colon]), pid > 0 else { return nil }
        return pid
    }

    static func readSmall(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 511)
        let n = read(fd, &buffer, buffer.count)
        guard n >= 0 else { return nil }
        return String(decoding: buffer[0..<n], as: UTF8.self)
    }
}

/// A dotlock this process created: removed only while it is still the same file with our content.
struct HeldDotlock: Sendable {
    var path: String
    var device: UInt64
    var inode: UInt64
    var content: String

    /// Whether the file at `path` is still the one we created.
    var isStillOurs: Bool {
        var info = stat()
        guard lstat(path, &info) == 0, UInt64(info.st_ino) == inode, UInt64(info.st_dev) == device else { return false }
        return Dotlock.readSmall(path) == content
    }

    /// Removes the lock if it is still ours. Returns a problem to report, or nil.
    func release() -> String? {
        guard isStillOurs else {
            return "\(path) is no longer the lock quiesce created (removed or replaced by someone else): left alone"
        }
        if unlink(path) != 0 && errno != ENOENT {
            return "cannot remove \(path): \(String(cString: strerror(errno)))"
        }
        return nil
    }
}

/// An open-file-description write lock on a whole mbox (`F_OFD_SETLK`): it conflicts with the
/// classic `fcntl` locks Dovecot takes, and unlike them is not dropped when another descriptor
/// of the same file in this process is closed. It dies with the process.
enum MboxFileLock {
    /// `F_OFD_SETLK` (Linux ≥ 3.15; not exported by Swift's Glibc module).
    static let ofdSetLock: Int32 = 37

    enum Attempt {
        case acquired(Int32)
        case busy
    }

    static func attempt(_ path: String) throws -> Attempt {
        let fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw POSIXFailure("open \(path)", errno) }
        var lock = flock()
        lock.l_type = Int16(F_WRLCK)
        lock.l_whence = Int16(SEEK_SET)
        lock.l_start = 0
        lock.l_len = 0
        lock.l_pid = 0
        if fcntl(fd, ofdSetLock, &lock) == 0 { return .acquired(fd) }
        let code = errno
        close(fd)
        if code == EAGAIN || code == EACCES { return .busy }
        throw POSIXFailure("fcntl write lock on \(path)", code)
    }
}
