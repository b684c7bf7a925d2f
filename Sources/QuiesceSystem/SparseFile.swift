import Foundation
import QuiesceCore

/// Files that take no space until written: datastore and disk images of the lab and tests.
public enum SparseFile {
    /// Creates the file at `path` (mode 0600) with a size of `size` bytes and no blocks.
    /// An existing file is truncated first: whatever it held is lost.
    public static func create(_ path: String, size: UInt64) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw POSIXFailure("create sparse file \(path)", errno) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else {
            throw POSIXFailure("set the size of sparse file \(path) to \(size) bytes", errno)
        }
    }
}
