import Foundation
import QuiesceCore

/// One piece of a delta in offset order: `length` bytes at `offset` to write (data) or to zero.
public struct DeltaChunk: Sendable, Equatable {
    public enum Kind: Sendable, Equatable { case data, zero }
    public var kind: Kind
    public var offset: UInt64
    public var length: UInt64
    /// The bytes of a data chunk; nil for zero chunks and for data chunks read with payload: false.
    public var payload: [UInt8]?

    public init(kind: Kind, offset: UInt64, length: UInt64, payload: [UInt8]? = nil) {
        self.kind = kind
        self.offset = offset
        self.length = length
        self.payload = payload
    }

    public var end: UInt64 { offset + length }
}

/// What a `DeltaReader` has done so far.
public struct DeltaReaderStats: Sendable, Equatable {
    /// Bytes of the data chunks returned (with or without their payload).
    public var dataBytes: UInt64 = 0
    /// Bytes of the zero chunks returned.
    public var zeroBytes: UInt64 = 0
    /// Bytes of `.compare` ranges examined (counted once, though read from both files).
    public var comparedBytes: UInt64 = 0
    /// Bytes read from disk, target and base together.
    public var bytesRead: UInt64 = 0
    /// Chunks returned.
    public var chunks: UInt64 = 0

    public init() {}
}

/// Reading a delta's bytes from a snapshot failed: which file, where, and why.
public struct DeltaReadError: Error, Sendable, CustomStringConvertible {
    /// The snapshot file.
    public var file: String
    /// The byte offset the reader was at, if the failure has one.
    public var offset: UInt64?
    /// What went wrong, e.g. "cannot read".
    public var problem: String
    /// errno, if a system call failed.
    public var code: Int32?
    /// What to do about it.
    public var hint: String?

    public init(file: String, offset: UInt64? = nil, _ problem: String, code: Int32? = nil, hint: String? = nil) {
        self.file = file
        self.offset = offset
        self.problem = problem
        self.code = code
        self.hint = hint
    }

    public var description: String {
        var text = "reading the delta: \(problem) \(file)"
        if let offset { text += " at offset \(offset)" }
        if let code { text += ": \(String(cString: strerror(code)))" }
        if let hint { text += "\n       (\(hint))" }
        return text
    }
}

/// Turns a snapshot's changed ranges into the chunks of a delta, reading the target
/// (and, for `.compare` ranges, the base) with large sequential requests.
///
/// - `.data` ranges become data chunks of at most `chunkSize` bytes, cut from the start
///   of each range.
/// - `.zero` ranges become zero chunks of at most 1 GiB; nothing is read.
/// - `.compare` ranges are read from both files in blocks of `compareBlockSize` (cut from
///   the start of the range); a block that differs becomes data, or zero if the target's
///   block is all zeros, merged with adjacent differing blocks of the same kind up to the
///   chunk limits. Bytes the base does not have (it is shorter) count as differing.
///
/// Chunk boundaries depend only on the ranges, the sizes and the two immutable files, so a
/// resumed sender produces the same chunks. One thread uses a reader at a time.
public final class DeltaReader {
    /// The largest zero chunk.
    public static let maxZeroChunk: UInt64 = 1 << 30

    private let targetPath: String
    private let basePath: String?
    private let targetFD: Int32
    private var baseFD: Int32 = -1
    private let ranges: [ChangedRange]
    private let chunkSize: Int
    private let blockSize: Int

    /// The range being read and the next offset in it.
    private var rangeIndex = 0
    private var cursor: UInt64 = 0

    // Compare state: one batch of blocks read from both files, and the differing blocks
    // gathered into the next chunk. Buffers are allocated once, on the first compare range.
    private var targetBatch: UnsafeMutableRawBufferPointer?
    private var baseBatch: UnsafeMutableRawBufferPointer?
    private var pendingBytes: UnsafeMutableRawBufferPointer?
    private var batchStart: UInt64 = 0
    private var batchLength = 0
    private var baseLength = 0
    private var pending: (kind: DeltaChunk.Kind, offset: UInt64, length: UInt64)?

    public private(set) var stats = DeltaReaderStats()

    /// Every data chunk, read ahead with several requests in flight; `dataIndex` is the next one.
    private var readAhead: ReadAhead?
    private var dataIndex = 0

    /// Bytes read from disk so far (target + base).
    public var bytesRead: UInt64 { stats.bytesRead }

    /// Reads `ranges` of `target` (and of `base` for `.compare` ranges) with large sequential requests.
    /// `ranges` must be sorted, non-overlapping and within `target`. A `compareBlockSize`
    /// larger than `chunkSize` is reduced to it (a differing block must fit in a chunk).
    public init(target: String, base: String?, ranges: [ChangedRange], chunkSize: Int = 4 << 20,
                compareBlockSize: Int = 64 << 10) throws {
        precondition(chunkSize > 0 && compareBlockSize > 0, "DeltaReader needs a positive chunkSize and compareBlockSize")
        self.targetPath = target
        self.basePath = base
        self.chunkSize = chunkSize
        self.blockSize = min(compareBlockSize, chunkSize)
        self.ranges = ranges.filter { $0.length > 0 }

        targetFD = try Self.openForReading(target)
        do {
            var info = stat()
            guard fstat(targetFD, &info) == 0 else { throw DeltaReadError(file: target, "cannot stat", code: errno) }
            let size = UInt64(info.st_size)
            var previousEnd: UInt64 = 0
            for range in self.ranges {
                guard range.offset >= previousEnd, range.offset <= range.offset &+ range.length else {
                    throw DeltaReadError(file: target, offset: range.offset, "changed ranges overlap or are out of order for",
                                         hint: "ranges must be sorted and disjoint, as ChangeTracking returns them")
                }
                guard range.end <= size else {
                    throw DeltaReadError(file: target, offset: range.offset,
                                         "a changed range of \(range.length) bytes ends past the \(size)-byte end of",
                                         hint: "the ranges were computed for another snapshot, or this one was truncated")
                }
                previousEnd = range.end
            }
            if self.ranges.contains(where: { $0.kind == .compare }) {
                guard let base else {
                    throw DeltaReadError(file: target, "a .compare range needs a base to compare against; none was given for",
                                         hint: "pass the base snapshot, or send a first replication without .compare ranges")
                }
                baseFD = try Self.openForReading(base)
            }
        } catch {
            close(targetFD)
            throw error
        }
        cursor = self.ranges.first?.offset ?? 0
        var pieces: [ReadAhead.Piece] = []
        for range in self.ranges where range.kind == .data {
            var at = range.offset
            while at < range.end {
                let length = min(range.end - at, UInt64(chunkSize))
                pieces.append(.init(offset: at, length: Int(length)))
                at += length
            }
        }
        if !pieces.isEmpty {
            // Deep enough to keep a disk busy, bounded in memory (depth × chunkSize at most).
            readAhead = ReadAhead(fd: targetFD, path: target, pieces: pieces, depth: max(2, min(16, (64 << 20) / chunkSize)))
        }
    }

    deinit {
        readAhead?.close()
        close(targetFD)
        if baseFD >= 0 { close(baseFD) }
        targetBatch?.deallocate()
        baseBatch?.deallocate()
        pendingBytes?.deallocate()
    }

    /// The ranges of a whole image of `size` bytes to hash-compare against its base: the
    /// "full hash scan" baseline, and the fallback where no change tracking is available.
    public static func fullCompareRanges(size: UInt64) -> [ChangedRange] {
        size == 0 ? [] : [ChangedRange(offset: 0, length: size, kind: .compare)]
    }

    /// The next chunk, or nil at the end. Data chunks are at most chunkSize; zero chunks at
    /// most 1 GiB. Chunk boundaries are deterministic for the same inputs (a resumed sender
    /// must produce the same chunks). payload: false skips reading a data chunk's bytes
    /// (resuming past chunks the receiver already has) — except inside `.compare` ranges,
    /// which must be read to know their chunks (their payload is still left out).
    public func next(payload: Bool = true) throws -> DeltaChunk? {
        while rangeIndex < ranges.count {
            let range = ranges[rangeIndex]
            if cursor >= range.end {
                if let chunk = takePending(payload: payload) { return emit(chunk) }
                rangeIndex += 1
                batchLength = 0
                if rangeIndex < ranges.count { cursor = ranges[rangeIndex].offset }
                continue
            }
            switch range.kind {
            case .zero:
                let chunk = DeltaChunk(kind: .zero, offset: cursor, length: min(range.end - cursor, Self.maxZeroChunk))
                cursor = chunk.end
                return emit(chunk)
            case .data:
                var chunk = DeltaChunk(kind: .data, offset: cursor, length: min(range.end - cursor, UInt64(chunkSize)))
                if let readAhead {
                    if payload {
                        let bytes = try readAhead.take(dataIndex)
                        stats.bytesRead += UInt64(bytes.count)
                        guard bytes.count == Int(chunk.length) else { throw endOfTarget(at: chunk.offset + UInt64(bytes.count)) }
                        Self.dropCache(targetFD, chunk.offset, bytes.count)
                        chunk.payload = bytes
                    } else {
                        readAhead.skip(dataIndex)
                    }
                    dataIndex += 1
                } else if payload {
                    chunk.payload = try readTarget(at: chunk.offset, count: Int(chunk.length))
                }
                // Past the chunk only once it is read: after a failed read, next() tries it again.
                cursor = chunk.end
                return emit(chunk)
            case .compare:
                if let chunk = try compare(until: range.end, payload: payload) { return emit(chunk) }
            }
        }
        return nil
    }

    private func emit(_ chunk: DeltaChunk) -> DeltaChunk {
        stats.chunks += 1
        switch chunk.kind {
        case .data: stats.dataBytes += chunk.length
        case .zero: stats.zeroBytes += chunk.length
        }
        return chunk
    }

    // MARK: compare

    /// Compares blocks from `cursor` on until a chunk is complete (returned) or `end` is
    /// reached (nil; the pending chunk, if any, is taken by the caller).
    private func compare(until end: UInt64, payload: Bool) throws -> DeltaChunk? {
        allocateCompareBuffers()
        let target = targetBatch!.baseAddress!, base = baseBatch!.baseAddress!
        while cursor < end {
            if cursor < batchStart || cursor >= batchStart + UInt64(batchLength) {
                try loadBatch(at: cursor, end: end)
            }
            let offset = cursor
            let length = Int(min(UInt64(blockSize), end - offset))
            let at = Int(offset - batchStart)
            cursor += UInt64(length)
            stats.comparedBytes += UInt64(length)
            let block = target + at
            let differs = at + length > baseLength || memcmp(block, base + at, length) != 0
            guard differs else {
                if let chunk = takePending(payload: payload) { return chunk }
                continue
            }
            let kind: DeltaChunk.Kind = Self.isZero(block, length) ? .zero : .data
            let limit = kind == .data ? UInt64(chunkSize) : Self.maxZeroChunk
            if let current = pending, current.kind == kind, current.offset + current.length == offset,
               current.length + UInt64(length) <= limit {
                if kind == .data { pendingBytes!.baseAddress!.advanced(by: Int(current.length)).copyMemory(from: block, byteCount: length) }
                pending!.length += UInt64(length)
                continue
            }
            let ready = takePending(payload: payload)
            if kind == .data { pendingBytes!.baseAddress!.copyMemory(from: block, byteCount: length) }
            pending = (kind, offset, UInt64(length))
            if let ready { return ready }
        }
        return nil
    }

    /// The differing blocks gathered so far, as a chunk; clears them.
    private func takePending(payload: Bool) -> DeltaChunk? {
        guard let current = pending else { return nil }
        pending = nil
        var chunk = DeltaChunk(kind: current.kind, offset: current.offset, length: current.length)
        if current.kind == .data, payload {
            chunk.payload = [UInt8](UnsafeRawBufferPointer(start: pendingBytes!.baseAddress!, count: Int(current.length)))
        }
        return chunk
    }

    private func allocateCompareBuffers() {
        guard targetBatch == nil else { return }
        // A batch is a whole number of blocks, so that no block straddles two batches.
        let batch = chunkSize / blockSize * blockSize
        targetBatch = .allocate(byteCount: batch, alignment: 4096)
        baseBatch = .allocate(byteCount: batch, alignment: 4096)
        pendingBytes = .allocate(byteCount: chunkSize, alignment: 4096)
    }

    /// Reads the next batch of blocks from `offset` (a block boundary) from both files.
    private func loadBatch(at offset: UInt64, end: UInt64) throws {
        let count = Int(min(UInt64(targetBatch!.count), end - offset))
        let target = UnsafeMutableRawBufferPointer(rebasing: targetBatch![0..<count])
        let gotTarget = try Self.read(targetFD, into: target, at: offset, path: targetPath)
        stats.bytesRead += UInt64(gotTarget)
        guard gotTarget == count else { throw endOfTarget(at: offset + UInt64(gotTarget)) }
        let base = UnsafeMutableRawBufferPointer(rebasing: baseBatch![0..<count])
        baseLength = try Self.read(baseFD, into: base, at: offset, path: basePath ?? "")
        stats.bytesRead += UInt64(baseLength)
        Self.dropCache(targetFD, offset, count)
        Self.dropCache(baseFD, offset, count)
        batchStart = offset
        batchLength = count
    }

    // MARK: reading

    private func readTarget(at offset: UInt64, count: Int) throws -> [UInt8] {
        var got = 0
        let bytes = try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            got = try Self.read(targetFD, into: UnsafeMutableRawBufferPointer(buffer), at: offset, path: targetPath)
            initialized = got
        }
        stats.bytesRead += UInt64(got)
        guard got == count else { throw endOfTarget(at: offset + UInt64(got)) }
        Self.dropCache(targetFD, offset, count)
        return bytes
    }

    private func endOfTarget(at offset: UInt64) -> DeltaReadError {
        DeltaReadError(file: targetPath, offset: offset, "unexpected end of file in",
                       hint: "the snapshot was truncated after its changed ranges were computed; snapshots must stay immutable")
    }

    /// Fills `buffer` from `offset`, stopping early only at the end of the file; returns the bytes read.
    /// Fills `buffer` from `offset` (short only at the end of the file); errors name the file.
    static func read(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64,
                     path: String) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n > 0 {
                done += n
            } else if n == 0 {
                break
            } else if errno != EINTR {
                let code = errno
                throw DeltaReadError(file: path, offset: offset + UInt64(done), "cannot read", code: code,
                                     hint: code == EIO ? "the datastore's disk reported an I/O error (see dmesg)" : nil)
            }
        }
        return done
    }

    private static func openForReading(_ path: String) throws -> Int32 {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let code = errno
            throw DeltaReadError(file: path, "cannot open", code: code,
                                 hint: code == ENOENT ? "the snapshot was deleted or pruned before it was sent" : nil)
        }
        // The reader goes through each file once, in offset order.
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL)
        return fd
    }

    /// Drops bytes already read from the page cache: a snapshot is read once, and a
    /// full scan of a large image must not evict the running VMs' cache. (A snapshot's
    /// pages are its own; the live image's cached pages are not touched.)
    private static func dropCache(_ fd: Int32, _ offset: UInt64, _ count: Int) {
        _ = posix_fadvise(fd, off_t(offset), off_t(count), POSIX_FADV_DONTNEED)
    }

    /// Whether `count` bytes at `bytes` are all zero.
    private static func isZero(_ bytes: UnsafeRawPointer, _ count: Int) -> Bool {
        guard count > 0 else { return true }
        return bytes.load(as: UInt8.self) == 0 && memcmp(bytes, bytes + 1, count - 1) == 0
    }
}
