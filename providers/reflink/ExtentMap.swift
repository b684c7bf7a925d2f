import CQuiesceSys
import Foundation
import QuiesceCore

/// One extent of a file as FIEMAP reports it: `length` bytes at file offset `logical`
/// stored at disk address `physical`.
public struct Extent: Sendable, Equatable {
    public var logical: UInt64
    public var physical: UInt64
    public var length: UInt64
    /// FIEMAP_EXTENT_* flags.
    public var flags: UInt32

    public init(logical: UInt64, physical: UInt64, length: UInt64, flags: UInt32 = 0) {
        self.logical = logical
        self.physical = physical
        self.length = length
        self.flags = flags
    }

    /// The first file offset past this extent.
    public var logicalEnd: UInt64 { logical + length }

    /// Preallocated but never written: reads as zeros.
    public var isUnwritten: Bool { flags & QUIESCE_FIEMAP_EXTENT_UNWRITTEN != 0 }

    /// Whether `physical` is a real disk address (not delayed allocation or unknown).
    public var hasKnownLocation: Bool {
        flags & (QUIESCE_FIEMAP_EXTENT_UNKNOWN | QUIESCE_FIEMAP_EXTENT_DELALLOC) == 0
    }
}

/// A file's physical layout (FIEMAP). Two reflink clones that share an extent map
/// the same logical range to the same physical address: comparing the maps of two
/// snapshots finds what changed between them without reading the data.
public enum ExtentMap {
    /// How many extents one FIEMAP call returns at most.
    static let batch = 256

    /// Every extent of the file at `path`, in logical order. Dirty data is flushed
    /// first (FIEMAP_FLAG_SYNC) so that it has a physical address. Holes are absent.
    public static func extents(of path: String) throws -> [Extent] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw POSIXFailure("open \(path) to map its extents", errno) }
        defer { close(fd) }

        var result: [Extent] = []
        var buffer = [quiesce_extent](repeating: quiesce_extent(), count: batch)
        var start: UInt64 = 0
        while true {
            var last: Int32 = 0
            let count = buffer.withUnsafeMutableBufferPointer { out in
                quiesce_fiemap(fd, start, UInt64.max - start, out.baseAddress, UInt32(out.count), &last)
            }
            guard count >= 0 else { throw POSIXFailure("FIEMAP \(path)", errno) }
            if count == 0 { break }
            for raw in buffer[0..<Int(count)] {
                result.append(Extent(logical: raw.logical, physical: raw.physical, length: raw.length, flags: raw.flags))
            }
            let end = result[result.count - 1].logicalEnd
            if last != 0 || end <= start { break }
            start = end
        }
        return result
    }

    /// Bytes that `a` and `b` (two files' extents, in logical order) store at the same
    /// physical address for the same logical offset: the data the two files share.
    /// Decided from the addresses alone; the SHARED flag is not trusted.
    public static func sharedBytes(_ a: [Extent], _ b: [Extent]) -> UInt64 {
        let a = a.filter(\.hasKnownLocation), b = b.filter(\.hasKnownLocation)
        var i = 0, j = 0
        var shared: UInt64 = 0
        while i < a.count, j < b.count {
            let x = a[i], y = b[j]
            let start = max(x.logical, y.logical), end = min(x.logicalEnd, y.logicalEnd)
            // Within one extent physical - logical is constant, so two overlapping
            // extents map the overlap to the same place iff their offsets agree.
            if start < end, x.physical &- x.logical == y.physical &- y.logical {
                shared += end - start
            }
            if x.logicalEnd <= y.logicalEnd { i += 1 } else { j += 1 }
        }
        return shared
    }

    /// Bytes that have a place on disk (the sum of the extents' lengths), unwritten ones included.
    public static func allocatedBytes(_ extents: [Extent]) -> UInt64 {
        extents.reduce(0) { $0 + $1.length }
    }

    /// Bytes of data on disk: allocated, known and written. Unwritten (preallocated)
    /// extents read as zeros like holes, and a reflink clone gets holes in their place.
    public static func dataBytes(_ extents: [Extent]) -> UInt64 {
        extents.reduce(0) { $0 + ($1.hasKnownLocation && !$1.isUnwritten ? $1.length : 0) }
    }
}
