import Foundation
import QuiesceCore
import QuiesceReplication
import QuiesceTestSupport
import ReflinkProvider
import Testing

private let unwritten: UInt32 = 0x800, unknown: UInt32 = 0x2, delalloc: UInt32 = 0x4, encoded: UInt32 = 0x8
private let inline: UInt32 = 0x200, shared: UInt32 = 0x2000, last: UInt32 = 0x1
private let KiB: UInt64 = 1024, MiB: UInt64 = 1 << 20

private func extent(_ logical: UInt64, _ physical: UInt64, _ length: UInt64, _ flags: UInt32 = 0) -> Extent {
    Extent(logical: logical, physical: physical, length: length, flags: flags)
}

private func data(_ offset: UInt64, _ length: UInt64) -> ChangedRange { ChangedRange(offset: offset, length: length, kind: .data) }
private func zero(_ offset: UInt64, _ length: UInt64) -> ChangedRange { ChangedRange(offset: offset, length: length, kind: .zero) }
private func compare(_ offset: UInt64, _ length: UInt64) -> ChangedRange {
    ChangedRange(offset: offset, length: length, kind: .compare)
}

private func changes(_ base: [Extent]?, _ target: [Extent], size: UInt64 = 1 * MiB, baseSize: UInt64? = nil) -> [ChangedRange] {
    ReflinkProvider.changedRanges(base: base, target: target, targetSize: size, baseSize: base == nil ? nil : (baseSize ?? size))
}

/// What changed between two snapshots, decided from their extent maps alone.
@Suite("Changed ranges from extent maps")
struct ChangedRangeTests {
    let base = [extent(0, 10 * MiB, 1 * MiB)]

    @Test func identicalMapsHaveNoChanges() {
        let map = [extent(0, 10 * MiB, 256 * KiB), extent(512 * KiB, 40 * MiB, 256 * KiB, unwritten | last)]
        #expect(changes(map, map).isEmpty)
    }

    @Test func theSameBlocksSplitDifferentlyAreUnchanged() {
        let target = [extent(0, 10 * MiB, 4 * KiB, shared), extent(4 * KiB, 10 * MiB + 4 * KiB, 1020 * KiB, shared)]
        #expect(changes(base, target).isEmpty)
    }

    @Test func aRewrittenBlockIsOneDataRange() {
        let target = [extent(0, 10 * MiB, 64 * KiB), extent(64 * KiB, 90 * MiB, 4 * KiB),
                      extent(68 * KiB, 10 * MiB + 68 * KiB, 956 * KiB)]
        #expect(changes(base, target) == [data(64 * KiB, 4 * KiB)])
    }

    @Test func theSameBlocksAtAnotherOffsetAreChanged() {
        let target = [extent(0, 10 * MiB + 4 * KiB, 4 * KiB), extent(4 * KiB, 10 * MiB + 4 * KiB, 1020 * KiB)]
        #expect(changes(base, target) == [data(0, 4 * KiB)])
    }

    @Test func theSharedFlagIsNotTrusted() {
        let target = [extent(0, 77 * MiB, 1 * MiB, shared)]
        #expect(changes(base, target) == [data(0, 1 * MiB)])
    }

    @Test func aPunchedHoleIsAZeroRange() {
        let target = [extent(0, 10 * MiB, 64 * KiB), extent(128 * KiB, 10 * MiB + 128 * KiB, 896 * KiB)]
        #expect(changes(base, target) == [zero(64 * KiB, 64 * KiB)])
    }

    @Test func unwrittenReadsAsZeros() {
        // Target unwritten over base data: zero. Unwritten or hole on both sides: unchanged,
        // whatever the addresses. Data over a base hole: data.
        let base = [extent(0, 10 * MiB, 512 * KiB), extent(512 * KiB, 50 * MiB, 256 * KiB, unwritten)]
        let target = [extent(0, 10 * MiB, 256 * KiB), extent(256 * KiB, 60 * MiB, 256 * KiB, unwritten),
                      extent(512 * KiB, 70 * MiB, 256 * KiB, unwritten), extent(768 * KiB, 80 * MiB, 64 * KiB)]
        #expect(changes(base, target) == [zero(256 * KiB, 256 * KiB), data(768 * KiB, 64 * KiB)])
    }

    @Test func extentsWithoutATrustworthyAddressAreCompared() {
        for flag in [unknown, delalloc, encoded, inline, unknown | delalloc] {
            let target = [extent(0, 10 * MiB, 512 * KiB), extent(512 * KiB, 0, 512 * KiB, flag)]
            #expect(changes(base, target) == [compare(512 * KiB, 512 * KiB)], "target flags \(flag)")
            // An untrusted base is compared too, even where the target's address matches it.
            let untrustedBase = [extent(0, 10 * MiB, 512 * KiB), extent(512 * KiB, 10 * MiB + 512 * KiB, 512 * KiB, flag)]
            #expect(changes(untrustedBase, base) == [compare(512 * KiB, 512 * KiB)], "base flags \(flag)")
            // And the same untrusted extent on both sides: it cannot vouch for itself.
            #expect(changes(target, target) == [compare(512 * KiB, 512 * KiB)])
        }
    }

    @Test func zerosOverAnUntrustedBaseAreZeroedWithoutComparing() {
        let base = [extent(0, 0, 1 * MiB, delalloc)]
        let target = [extent(0, 10 * MiB, 512 * KiB)]
        #expect(changes(base, target) == [compare(0, 512 * KiB), zero(512 * KiB, 512 * KiB)])
    }

    @Test func adjacentRangesOfTheSameKindAreMerged() {
        let target = [extent(0, 20 * MiB, 64 * KiB), extent(64 * KiB, 30 * MiB, 64 * KiB),  // two new places: one data range
                      extent(128 * KiB, 10 * MiB + 128 * KiB, 64 * KiB),                  // unchanged
                      extent(192 * KiB, 40 * MiB, 64 * KiB),                               // data, then a hole: not merged
                      extent(320 * KiB, 0, 64 * KiB, unknown), extent(384 * KiB, 0, 64 * KiB, delalloc),
                      extent(448 * KiB, 10 * MiB + 448 * KiB, 576 * KiB)]
        #expect(changes(base, target) == [data(0, 128 * KiB), data(192 * KiB, 64 * KiB), zero(256 * KiB, 64 * KiB),
                                          compare(320 * KiB, 128 * KiB)])
    }

    @Test func randomMapsAgreeWithABlockByBlockReading() {
        // Random maps, compared with what each 4 KiB block reads as on either side; the
        // output is also sorted, disjoint, merged and within the target's size.
        var generator = SeededGenerator(seed: 7)
        let block = 4 * KiB
        func randomMap() -> [Extent] {
            var map: [Extent] = [], at: UInt64 = 0
            while at < 2 * MiB {
                at += UInt64.random(in: 0...3, using: &generator) * block
                let length = UInt64.random(in: 1...16, using: &generator) * block
                let flags: UInt32 = [0, 0, 0, shared, unwritten, delalloc].randomElement(using: &generator)!
                map.append(extent(at, at + UInt64.random(in: 0...2, using: &generator) * MiB, length, flags))
                at += length
            }
            return map
        }
        enum Reads: Equatable { case zeros, data(UInt64), untrusted }
        func reads(_ map: [Extent], _ offset: UInt64, size: UInt64) -> Reads {
            guard offset < size, let e = map.first(where: { $0.logical <= offset && offset < $0.logicalEnd }) else { return .zeros }
            if e.flags & delalloc != 0 { return .untrusted }
            return e.flags & unwritten != 0 ? .zeros : .data(e.physical - e.logical)
        }
        for round in 0..<300 {
            let base = randomMap(), target = randomMap()
            let size = UInt64.random(in: 1...512, using: &generator) * block
            let baseSize = UInt64.random(in: 0...512, using: &generator) * block
            let first = round % 4 == 0
            let ranges = changes(first ? nil : base, target, size: size, baseSize: baseSize)

            var expected: [ChangedRange.Kind?] = []
            for offset in stride(from: 0, to: size, by: Int(block)) {
                let t = reads(target, offset, size: size), b = reads(base, offset, size: baseSize)
                switch (t, b) {
                case (.zeros, _) where first: expected.append(nil)
                case (_, _) where first: expected.append(.data)
                case (.zeros, .zeros): expected.append(nil)
                case (.zeros, _): expected.append(.zero)
                case (.untrusted, _), (_, .untrusted): expected.append(.compare)
                case (.data(let x), .data(let y)) where x == y: expected.append(nil)
                default: expected.append(.data)
                }
            }
            var seen = [ChangedRange.Kind?](repeating: nil, count: expected.count)
            for range in ranges {
                for index in Int(range.offset / block)..<Int(range.end / block) { seen[index] = range.kind }
            }
            #expect(seen == expected, "round \(round)")
            for (a, b) in zip(ranges, ranges.dropFirst()) {
                #expect(a.end < b.offset || (a.end == b.offset && a.kind != b.kind), "round \(round): sorted, disjoint, merged")
            }
            #expect(ranges.allSatisfy { $0.length > 0 && $0.end <= size && $0.offset % block == 0 && $0.length % block == 0 })
        }
    }

    @Test func aGrownImageSendsItsNewData() {
        // The base ends at 1 MiB; its extent past the end (speculative preallocation) is ignored.
        let base = [extent(0, 10 * MiB, 2 * MiB)]
        let target = [extent(0, 10 * MiB, 1 * MiB), extent(1 * MiB, 11 * MiB, 512 * KiB),  // same place, but new bytes
                      extent(3 * MiB, 50 * MiB, 64 * KiB, unwritten)]
        #expect(changes(base, target, size: 4 * MiB, baseSize: 1 * MiB) == [data(1 * MiB, 512 * KiB)])
    }

    @Test func aShrunkImageSendsNothingPastItsEnd() {
        let target = [extent(0, 10 * MiB, 1 * MiB)]
        #expect(changes(base, target, size: 100 * KiB, baseSize: 1 * MiB).isEmpty)
        let rewritten = [extent(0, 60 * MiB, 1 * MiB)]
        #expect(changes(base, rewritten, size: 100 * KiB, baseSize: 1 * MiB) == [data(0, 100 * KiB)])
    }

    @Test func rangesAreClippedToAnUnalignedSize() {
        let target = [extent(0, 60 * MiB, 8 * KiB)]
        #expect(changes(nil, target, size: 5000) == [data(0, 5000)])
    }

    @Test func aFirstReplicationSendsDataAndUntrustedExtentsAndLeavesHolesOut() {
        let target = [extent(0, 10 * MiB, 64 * KiB), extent(64 * KiB, 20 * MiB, 64 * KiB),
                      extent(128 * KiB, 30 * MiB, 64 * KiB, unwritten), extent(256 * KiB, 0, 64 * KiB, delalloc),
                      extent(320 * KiB, 40 * MiB, 64 * KiB, encoded | last)]
        #expect(changes(nil, target) == [data(0, 128 * KiB), data(256 * KiB, 128 * KiB)])
        #expect(changes(nil, []).isEmpty)
    }
}

extension ChangedRangeTests {
    /// Turning changed ranges into delta chunks (DeltaReader), on plain files.
    @Suite("Changed ranges read as delta chunks")
    struct ReadAsDeltaChunks {
        @Test func dataRangesAreCutIntoChunksAndCanBeSkippedWithoutReading() throws {
            try withTemporaryDirectory { directory in
                let bytes = pattern(seed: 1, count: 1 << 20)
                let target = try write(directory + "/target", bytes)
                let ranges = [data(4096, 600 * KiB), zero(700 * KiB, 100 * KiB), data(900 * KiB, 124 * KiB)]
                let reader = try DeltaReader(target: target, base: nil, ranges: ranges, chunkSize: 256 << 10)
                let chunks = try all(reader)
                #expect(chunks.map { [$0.offset, $0.length] } == [[4096, 256 * KiB], [4096 + 256 * KiB, 256 * KiB],
                                                                [4096 + 512 * KiB, 88 * KiB], [700 * KiB, 100 * KiB],
                                                                [900 * KiB, 124 * KiB]])
                for chunk in chunks where chunk.kind == .data {
                    #expect(chunk.payload == Array(bytes[Int(chunk.offset)..<Int(chunk.end)]))
                }
                #expect(reader.bytesRead == 724 * KiB)
                #expect(reader.stats == stats(data: 724 * KiB, zero: 100 * KiB, compared: 0, read: 724 * KiB, chunks: 5))

                let skipping = try DeltaReader(target: target, base: nil, ranges: ranges, chunkSize: 256 << 10)
                let skipped = try all(skipping, payload: false)
                #expect(skipped.map { DeltaChunk(kind: $0.kind, offset: $0.offset, length: $0.length) }
                            == chunks.map { DeltaChunk(kind: $0.kind, offset: $0.offset, length: $0.length) })
                #expect(skipped.allSatisfy { $0.payload == nil })
                #expect(skipping.bytesRead == 0)
            }
        }

        @Test func compareSendsOnlyDifferingBlocksMergedUpToTheChunkSize() throws {
            try withTemporaryDirectory { directory in
                let block = 64 << 10
                let old = pattern(seed: 2, count: 16 * block)
                var new = old
                for index in [1, 2, 3, 4, 5, 9, 15] { new[index * block + 7] ^= 0xFF }     // data blocks
                for index in [11, 12] { new.replaceSubrange(index * block..<(index + 1) * block, with: repeatElement(0, count: block)) }
                let base = try write(directory + "/base", old), target = try write(directory + "/target", new)
                let reader = try DeltaReader(target: target, base: base, ranges: DeltaReader.fullCompareRanges(size: UInt64(new.count)),
                                             chunkSize: 4 * block, compareBlockSize: block)
                let chunks = try all(reader)
                let b = UInt64(block)
                #expect(chunks.map { DeltaChunk(kind: $0.kind, offset: $0.offset, length: $0.length) } == [
                    DeltaChunk(kind: .data, offset: 1 * b, length: 4 * b), DeltaChunk(kind: .data, offset: 5 * b, length: b),
                    DeltaChunk(kind: .data, offset: 9 * b, length: b), DeltaChunk(kind: .zero, offset: 11 * b, length: 2 * b),
                    DeltaChunk(kind: .data, offset: 15 * b, length: b),
                ])
                #expect(try apply(chunks, to: old, size: new.count) == new)
                #expect(reader.bytesRead == 2 * UInt64(new.count))
                #expect(reader.stats.comparedBytes == UInt64(new.count))

                // Resuming: the same chunks without payloads, though the bytes are still read.
                let resumed = try DeltaReader(target: target, base: base, ranges: DeltaReader.fullCompareRanges(size: UInt64(new.count)),
                                              chunkSize: 4 * block, compareBlockSize: block)
                let skipped = try all(resumed, payload: false)
                #expect(skipped.map(\.offset) == chunks.map(\.offset) && skipped.map(\.length) == chunks.map(\.length))
                #expect(skipped.allSatisfy { $0.payload == nil })
            }
        }

        @Test func bytesBeyondAShorterBaseDiffer() throws {
            try withTemporaryDirectory { directory in
                let new = pattern(seed: 3, count: 300_000)
                let old = Array(new[0..<100_000])
                let base = try write(directory + "/base", old), target = try write(directory + "/target", new)
                let reader = try DeltaReader(target: target, base: base, ranges: [compare(0, 300_000)],
                                             chunkSize: 1 << 20, compareBlockSize: 64 << 10)
                let chunks = try all(reader)
                // Block 1 (65536..<131072) holds the base's end: it differs as a whole.
                #expect(chunks.map { [$0.offset, $0.length] } == [[65536, 300_000 - 65536]])
                #expect(try apply(chunks, to: old, size: new.count) == new)
            }
        }

        @Test func largeZeroRangesAreCutAtOneGiB() throws {
            try withTemporaryDirectory { directory in
                let target = directory + "/target"
                #expect(FileManager.default.createFile(atPath: target, contents: nil))
                #expect(truncate(target, off_t(3 << 30)) == 0)
                let reader = try DeltaReader(target: target, base: nil, ranges: [zero(4096, (3 << 30) - 4096)])
                let chunks = try all(reader)
                #expect(chunks.map(\.length) == [1 << 30, 1 << 30, (1 << 30) - 4096])
                #expect(chunks.allSatisfy { $0.kind == .zero && $0.payload == nil })
                #expect(reader.bytesRead == 0)
            }
        }

        @Test func rangesPastTheEndOfTheSnapshotAreRefusedNamingTheFile() throws {
            try withTemporaryDirectory { directory in
                let target = try write(directory + "/target", pattern(seed: 4, count: 8192))
                let error = #expect(throws: DeltaReadError.self) {
                    _ = try DeltaReader(target: target, base: nil, ranges: [data(4096, 8192)])
                }
                #expect(error?.description.contains(target) == true)
                #expect(error?.description.contains("4096") == true)
                #expect(throws: DeltaReadError.self) {
                    _ = try DeltaReader(target: target, base: nil, ranges: [compare(0, 4096)])
                }
                let missing = #expect(throws: DeltaReadError.self) {
                    _ = try DeltaReader(target: directory + "/gone", base: nil, ranges: [])
                }
                #expect(missing?.description.contains("No such file") == true)
            }
        }
    }
}

// MARK: helpers

private func all(_ reader: DeltaReader, payload: Bool = true) throws -> [DeltaChunk] {
    var chunks: [DeltaChunk] = []
    while let chunk = try reader.next(payload: payload) { chunks.append(chunk) }
    return chunks
}

private func apply(_ chunks: [DeltaChunk], to base: [UInt8], size: Int) throws -> [UInt8] {
    var result = base + [UInt8](repeating: 0, count: max(0, size - base.count))
    result = Array(result[0..<size])
    for chunk in chunks {
        let range = Int(chunk.offset)..<Int(chunk.end)
        switch chunk.kind {
        case .data: result.replaceSubrange(range, with: try #require(chunk.payload))
        case .zero: result.replaceSubrange(range, with: repeatElement(0, count: range.count))
        }
    }
    return result
}

private func stats(data: UInt64, zero: UInt64, compared: UInt64, read: UInt64, chunks: UInt64) -> DeltaReaderStats {
    var stats = DeltaReaderStats()
    stats.dataBytes = data
    stats.zeroBytes = zero
    stats.comparedBytes = compared
    stats.bytesRead = read
    stats.chunks = chunks
    return stats
}

private func write(_ path: String, _ bytes: [UInt8]) throws -> String {
    guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else {
        throw POSIXFailure("create \(path)", errno)
    }
    return path
}

/// A reproducible RandomNumberGenerator (xorshift64).
private struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }
    mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
}

/// `count` deterministic pseudo-random bytes.
private func pattern(seed: UInt64, count: Int) -> [UInt8] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<count).map { _ in
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
    }
}
