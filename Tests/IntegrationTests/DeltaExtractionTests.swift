import CQuiesceSys
import Foundation
import QuiesceCore
import QuiesceReplication
import QuiesceTestSupport
import ReflinkProvider
import Testing

/// Delta extraction between two reflink snapshots of an image on a real XFS datastore:
/// the changed ranges come from the extent maps, the reader reads only them, and the
/// chunks rebuild the target from the base byte for byte.
@Suite(.serialized, .enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI))
struct DeltaExtractionTests {
    let provider = ReflinkProvider()
    static let block = 4096

    @Test func changedRangesCoverEveryRewrittenBlockAndRebuildTheTarget() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with(.init(imageSize: 128 << 20, mountGuests: false)) { world in
            let size = world.options.imageSize
            var random = Xorshift(seed: 11)
            // Base: 8 regions of 12 MiB of data spread over the image, with holes between them.
            for region in 0..<8 {
                try pwriteAll(world.image, random.bytes(12 << 20), at: UInt64(region) * (size / 8) + (2 << 20))
            }
            let base = try snapshot(world, "20260101T000000101Z")

            // 300 random 4 KiB blocks, into data and into holes.
            var written = Set<UInt64>()
            let fd = open(world.image, O_WRONLY | O_CLOEXEC)
            #expect(fd >= 0)
            for _ in 0..<300 {
                let offset = random.next(below: size / UInt64(Self.block)) * UInt64(Self.block)
                try pwriteAll(fd, random.bytes(Self.block), at: offset, path: world.image)
                written.insert(offset)
            }
            #expect(fsync(fd) == 0)
            close(fd)
            let target = try snapshot(world, "20260101T000000102Z")

            // (a) The changed ranges cover every written block, and little else.
            let started = ContinuousClock.now
            let ranges = try provider.changedRanges(from: base, to: target)
            let mapping = ContinuousClock.now - started
            for offset in written {
                #expect(ranges.contains { $0.kind == .data && $0.offset <= offset && offset + UInt64(Self.block) <= $0.end },
                        "written block at \(offset) is in a data range")
            }
            #expect(ranges.allSatisfy { $0.kind == .data }, "nothing was zeroed or untrusted: \(ranges.filter { $0.kind != .data })")
            let writtenBytes = UInt64(written.count * Self.block)
            let changedBytes = ranges.reduce(0) { $0 + $1.length }
            print("delta: \(written.count) blocks written (\(writtenBytes) B) -> \(ranges.count) ranges, "
                  + "\(changedBytes) B changed (\(String(format: "%.2f", Double(changedBytes) / Double(writtenBytes)))x), "
                  + "extent maps compared in \(mapping)")
            // XFS remaps exactly the written blocks into the data fork when the CoW write
            // completes (the cowextsize preallocation stays in the CoW fork), so the changed
            // bytes equal the written bytes here; the bound leaves room for a filesystem
            // that rounds CoW up to its extent size hint (XFS default 32 blocks).
            #expect(changedBytes >= writtenBytes)
            #expect(changedBytes <= 4 * writtenBytes)

            // (b) The chunks applied to a copy of the base rebuild the target.
            let receiver = world.datastore + "/receiver.img"
            try cloneFile(base, to: receiver)
            let reader = try DeltaReader(target: target, base: base, ranges: ranges)
            try apply(reader, to: receiver, size: size)
            #expect(try digest(receiver) == digest(target))

            // (c) The reader read the data chunks, nothing more.
            #expect(reader.bytesRead == reader.stats.dataBytes)
            #expect(reader.stats.dataBytes == changedBytes)
            #expect(reader.bytesRead < size / 50)

            // (d) The full hash scan gets the same result by reading both images whole.
            let scanned = world.datastore + "/scanned.img"
            try cloneFile(base, to: scanned)
            // Read from the datastore rather than from the page cache, for the figure below.
            try dropCache(base)
            try dropCache(target)
            let scanStarted = ContinuousClock.now
            let scan = try DeltaReader(target: target, base: base, ranges: DeltaReader.fullCompareRanges(size: size))
            try apply(scan, to: scanned, size: size)
            let scanTime = ContinuousClock.now - scanStarted
            #expect(try digest(scanned) == digest(target))
            #expect(scan.bytesRead == 2 * size)
            #expect(scan.stats.comparedBytes == size)
            // It sends the whole 64 KiB compare block around each written 4 KiB block: at
            // most 16 times the written bytes (18.9 MB for 1.2 MB written here).
            #expect(scan.stats.dataBytes >= writtenBytes && scan.stats.dataBytes <= 16 * writtenBytes)
            let seconds = Double(scanTime.components.seconds) + Double(scanTime.components.attoseconds) * 1e-18
            print("full compare: read \(scan.bytesRead) B in \(scanTime) "
                  + "(\(String(format: "%.0f", Double(scan.bytesRead) / seconds / 1e6)) MB/s), "
                  + "sent \(scan.stats.dataBytes) B data + \(scan.stats.zeroBytes) B zeros in \(scan.stats.chunks) chunks; "
                  + "extent delta read \(reader.bytesRead) B in \(reader.stats.chunks) chunks")
        }
    }

    @Test func firstSendOfASparseImageReadsOnlyItsData() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with(.init(imageSize: 256 << 20, mountGuests: false)) { world in
            let size = world.options.imageSize
            var random = Xorshift(seed: 12)
            for region in 0..<4 {
                try pwriteAll(world.image, random.bytes(3 << 20), at: UInt64(region) * (size / 4) + (7 << 20))
            }
            let first = try snapshot(world, "20260101T000000201Z")
            let ranges = try provider.changedRanges(from: nil, to: first)
            #expect(ranges.allSatisfy { $0.kind == .data })
            let sent = ranges.reduce(0) { $0 + $1.length }
            #expect(sent == ExtentMap.dataBytes(try ExtentMap.extents(of: first)))
            #expect(sent >= 12 << 20 && sent < size / 8, "the written data and the guest filesystem's metadata")

            let receiver = world.datastore + "/receiver.img"
            let fd = open(receiver, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            #expect(fd >= 0)
            close(fd)
            try dropCache(first)
            let reader = try DeltaReader(target: first, base: nil, ranges: ranges)
            let started = ContinuousClock.now
            try apply(reader, to: receiver, size: size)
            let elapsed = ContinuousClock.now - started
            #expect(reader.bytesRead == sent)
            #expect(reader.stats.zeroBytes == 0)
            #expect(try digest(receiver) == digest(first))
            // Holes were not sent, so the copy is as sparse as the snapshot. (XFS allocated
            // 13.3 MB for 12.9 MB sent here: allocation rounding around the small metadata
            // ranges; the margin allows for more.)
            #expect(try allocatedBytes(receiver) <= sent + (4 << 20))
            print("first send: \(sent) B of data in \(ranges.count) ranges of a \(size) B image, "
                  + "read and applied in \(elapsed), receiver allocated \(try allocatedBytes(receiver)) B")
        }
    }

    @Test func aHolePunchedInTheLiveImageIsSentAsAZeroRange() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with(.init(imageSize: 64 << 20, mountGuests: false)) { world in
            let size = world.options.imageSize
            var random = Xorshift(seed: 13)
            try pwriteAll(world.image, random.bytes(16 << 20), at: 32 << 20)
            let base = try snapshot(world, "20260101T000000301Z")
            try punchHole(world.image, at: 40 << 20, length: 1 << 20)
            let target = try snapshot(world, "20260101T000000302Z")

            let ranges = try provider.changedRanges(from: base, to: target)
            #expect(ranges == [ChangedRange(offset: 40 << 20, length: 1 << 20, kind: .zero)])

            let receiver = world.datastore + "/receiver.img"
            try cloneFile(base, to: receiver)
            let reader = try DeltaReader(target: target, base: base, ranges: ranges)
            try apply(reader, to: receiver, size: size)
            #expect(reader.bytesRead == 0)
            #expect(reader.stats.zeroBytes == 1 << 20)
            #expect(try digest(receiver) == digest(target))
        }
    }

    @Test func aGrownImageSendsOnlyItsNewData() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with(.init(imageSize: 64 << 20, mountGuests: false)) { world in
            var random = Xorshift(seed: 15)
            try pwriteAll(world.image, random.bytes(8 << 20), at: 8 << 20)
            let base = try snapshot(world, "20260101T000000501Z")
            // The operator grows the disk by 32 MiB and the guest writes 1 MiB into the new space.
            let grown: UInt64 = 96 << 20
            #expect(truncate(world.image, off_t(grown)) == 0)
            try pwriteAll(world.image, random.bytes(1 << 20), at: 80 << 20)
            let target = try snapshot(world, "20260101T000000502Z")

            let ranges = try provider.changedRanges(from: base, to: target)
            #expect(ranges == [ChangedRange(offset: 80 << 20, length: 1 << 20, kind: .data)])
            let receiver = world.datastore + "/receiver.img"
            try cloneFile(base, to: receiver)
            let reader = try DeltaReader(target: target, base: base, ranges: ranges)
            try apply(reader, to: receiver, size: grown)
            #expect(reader.bytesRead == 1 << 20)
            #expect(try digest(receiver) == digest(target))
        }
    }

    @Test func unchangedSnapshotsHaveNoDelta() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with(.init(imageSize: 64 << 20, mountGuests: false)) { world in
            var random = Xorshift(seed: 14)
            try pwriteAll(world.image, random.bytes(8 << 20), at: 8 << 20)
            let base = try snapshot(world, "20260101T000000401Z")
            let target = try snapshot(world, "20260101T000000402Z")
            #expect(try provider.changedRanges(from: base, to: target).isEmpty)
        }
    }

    // MARK: helpers

    /// A committed snapshot of the world's volumes (nothing mounted, so nothing to freeze).
    func snapshot(_ world: TestWorld, _ id: String) throws -> String {
        try provider.prepare(world.volumes, checkpointID: id)
        return try provider.commit(try provider.capture(world.volumes, checkpointID: id))[0].path
    }
}

// MARK: helpers

/// What a receiver does with the chunks: write data, punch zeros, set the size, fsync.
private func apply(_ reader: DeltaReader, to path: String, size: UInt64) throws {
    let fd = open(path, O_RDWR | O_CLOEXEC)
    guard fd >= 0 else { throw POSIXFailure("open \(path)", errno) }
    defer { close(fd) }
    var previousEnd: UInt64 = 0
    while let chunk = try reader.next() {
        #expect(chunk.offset >= previousEnd, "chunks come in offset order")
        #expect(chunk.kind == .zero ? chunk.length <= 1 << 30 : chunk.length <= 4 << 20)
        previousEnd = chunk.end
        switch chunk.kind {
        case .data:
            let payload = try #require(chunk.payload)
            #expect(UInt64(payload.count) == chunk.length)
            try pwriteAll(fd, payload, at: chunk.offset, path: path)
        case .zero:
            guard quiesce_fallocate_punch(fd, chunk.offset, chunk.length) == 0 else { throw POSIXFailure("punch \(path)", errno) }
        }
    }
    guard ftruncate(fd, off_t(size)) == 0, fsync(fd) == 0 else { throw POSIXFailure("finish \(path)", errno) }
}

private func punchHole(_ path: String, at offset: UInt64, length: UInt64) throws {
    let fd = open(path, O_RDWR | O_CLOEXEC)
    guard fd >= 0 else { throw POSIXFailure("open \(path)", errno) }
    defer { close(fd) }
    guard quiesce_fallocate_punch(fd, offset, length) == 0, fsync(fd) == 0 else { throw POSIXFailure("punch \(path)", errno) }
}

/// fallocate(PUNCH_HOLE | KEEP_SIZE), looked up by name: Glibc's Swift module does not export it.
private func quiesce_fallocate_punch(_ fd: Int32, _ offset: UInt64, _ length: UInt64) -> Int32 {
    typealias Fallocate = @convention(c) (Int32, Int32, Int64, Int64) -> Int32
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "fallocate") else { errno = ENOSYS; return -1 }
    let punchHole: Int32 = 0x02, keepSize: Int32 = 0x01
    return unsafeBitCast(symbol, to: Fallocate.self)(fd, punchHole | keepSize, Int64(offset), Int64(length))
}

/// A writable reflink copy of a (read-only) snapshot, as a receiver starts from its base.
private func cloneFile(_ source: String, to destination: String) throws {
    let from = open(source, O_RDONLY | O_CLOEXEC)
    guard from >= 0 else { throw POSIXFailure("open \(source)", errno) }
    defer { close(from) }
    let to = open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
    guard to >= 0 else { throw POSIXFailure("create \(destination)", errno) }
    defer { close(to) }
    guard quiesce_ficlone(to, from) == 0 else { throw POSIXFailure("FICLONE \(source) → \(destination)", errno) }
}

private func pwriteAll(_ path: String, _ bytes: [UInt8], at offset: UInt64) throws {
    let fd = open(path, O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { throw POSIXFailure("open \(path)", errno) }
    defer { close(fd) }
    try pwriteAll(fd, bytes, at: offset, path: path)
    guard fsync(fd) == 0 else { throw POSIXFailure("fsync \(path)", errno) }
}

private func pwriteAll(_ fd: Int32, _ bytes: [UInt8], at offset: UInt64, path: String) throws {
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, $0.count - done, off_t(offset) + off_t(done)) }
        guard n > 0 else { throw POSIXFailure("write \(path)", errno) }
        done += n
    }
}

/// SHA-256 of a whole file, hex.
private func digest(_ path: String) throws -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw POSIXFailure("open \(path)", errno) }
    defer { close(fd) }
    var sha = SHA256Digest()
    var buffer = [UInt8](repeating: 0, count: 4 << 20)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n >= 0 else { throw POSIXFailure("read \(path)", errno) }
        if n == 0 { break }
        buffer.withUnsafeBytes { sha.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
    }
    return sha.finish().map { String(format: "%02x", $0) }.joined()
}

private func dropCache(_ path: String) throws {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw POSIXFailure("open \(path)", errno) }
    defer { close(fd) }
    _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
}

private func allocatedBytes(_ path: String) throws -> UInt64 {
    var info = stat()
    guard stat(path, &info) == 0 else { throw POSIXFailure("stat \(path)", errno) }
    return UInt64(info.st_blocks) * 512
}

/// Deterministic pseudo-random numbers and bytes.
private struct Xorshift {
    var state: UInt64
    init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }
    mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
    mutating func next(below bound: UInt64) -> UInt64 { next() % bound }
    mutating func bytes(_ count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { raw in
            let words = raw.bindMemory(to: UInt64.self)
            for index in words.indices { words[index] = next() }
        }
        return bytes
    }
}
