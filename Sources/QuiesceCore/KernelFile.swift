import Foundation

/// Reads a /proc or /sys file whole. These report a size of 0 and are produced a page at a
/// time, so size-based readers (`String(contentsOfFile:)`) may stop after the first 4 KiB:
/// with a few dozen mounts, /proc/self/mountinfo is longer than that.
public enum KernelFile {
    public static func read(_ path: String) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = Glibc.read(fd, &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { return nil }
            if n == 0 { return bytes }
            bytes += chunk[0..<n]
        }
    }

    public static func text(_ path: String) -> String? {
        read(path).map { String(decoding: $0, as: UTF8.self) }
    }
}
