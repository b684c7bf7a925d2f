import CQuiesceSys
import Foundation

/// syncfs + FIFREEZE / FITHAW of guest filesystems through their mount points.
public enum FilesystemHold {
    /// Opens a mount point for the freeze ioctls. The descriptor stays valid while frozen.
    public static func open(_ mount: String) throws -> Int32 {
        let fd = Glibc.open(mount, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw POSIXFailure("open mount point \(mount)", errno) }
        return fd
    }

    /// Writes out dirty data without blocking writers (done before the hold, to keep it short).
    public static func sync(_ fd: Int32, mount: String) throws {
        guard quiesce_syncfs(fd) == 0 else { throw POSIXFailure("syncfs \(mount)", errno) }
    }

    /// FIFREEZE: flushes and blocks new writes until `thaw`.
    public static func freeze(_ fd: Int32, mount: String) throws {
        guard quiesce_fifreeze(fd) == 0 else {
            let code = errno
            if code == EBUSY {
                throw POSIXFailure("FIFREEZE \(mount) (already frozen by someone else)", code)
            }
            throw POSIXFailure("FIFREEZE \(mount)", code)
        }
    }

    /// FITHAW. Returns false if it was not frozen (EINVAL), which is not an error for a thaw.
    @discardableResult
    public static func thaw(_ fd: Int32, mount: String) throws -> Bool {
        if quiesce_fithaw(fd) == 0 { return true }
        if errno == EINVAL { return false }
        throw POSIXFailure("FITHAW \(mount)", errno)
    }

    /// Whether this process may freeze filesystems (CAP_SYS_ADMIN in its effective set).
    public static var canFreeze: Bool {
        guard let status = KernelFile.text("/proc/self/status"),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("CapEff:") }),
              let mask = UInt64(line.dropFirst("CapEff:".count).trimmingCharacters(in: .whitespaces), radix: 16) else {
            return geteuid() == 0
        }
        return mask & (1 << 21) != 0
    }

    /// Whether `path` is a mount point (its device differs from its parent's, or it is /).
    public static func isMountPoint(_ path: String) -> Bool {
        var own = stat(), parent = stat()
        guard stat(path, &own) == 0, stat(path + "/..", &parent) == 0 else { return false }
        return own.st_dev != parent.st_dev || own.st_ino == parent.st_ino
    }
}
