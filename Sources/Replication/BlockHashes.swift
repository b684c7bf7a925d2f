import Foundation

/// XXH3-128 of every fixed-size block of a file: what a scrub compares between the
/// primary's snapshot and the DR copy (each side hashes its own; only the hashes travel).
public enum BlockHashes {
    public static let defaultBlockSize = 1 << 20

    public static func compute(_ path: String, blockSize: Int = defaultBlockSize) throws -> [Checksum128] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw DeltaStreamError.store("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL)
        let perRead = max(1, (16 << 20) / blockSize) * blockSize
        var buffer = [UInt8](repeating: 0, count: perRead)
        var hashes: [Checksum128] = []
        var offset: off_t = 0
        while true {
            var filled = 0
            while filled < perRead {
                let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + filled, perRead - filled, offset + off_t(filled)) }
                if n < 0, errno == EINTR { continue }
                guard n >= 0 else { throw DeltaStreamError.store("reading \(path) at \(offset): \(String(cString: strerror(errno)))") }
                if n == 0 { break }
                filled += n
            }
            if filled == 0 { break }
            buffer.withUnsafeBytes { all in
                for start in stride(from: 0, to: filled, by: blockSize) {
                    hashes.append(Checksum128(of: UnsafeRawBufferPointer(rebasing: all[start..<min(start + blockSize, filled)])))
                }
            }
            _ = posix_fadvise(fd, offset, off_t(filled), POSIX_FADV_DONTNEED)
            offset += off_t(filled)
            if filled < perRead { break }
        }
        return hashes
    }

    static func encode(_ hashes: [Checksum128]) -> String { hashes.map(\.description).joined() }

    static func decode(_ text: String) -> [Checksum128]? {
        let characters = Array(text.utf8)
        guard characters.count % 32 == 0 else { return nil }
        var result: [Checksum128] = []
        result.reserveCapacity(characters.count / 32)
        for start in stride(from: 0, to: characters.count, by: 32) {
            guard let high = UInt64(String(decoding: characters[start..<start + 16], as: UTF8.self), radix: 16),
                  let low = UInt64(String(decoding: characters[start + 16..<start + 32], as: UTF8.self), radix: 16)
            else { return nil }
            result.append(Checksum128(high: high, low: low))
        }
        return result
    }
}
