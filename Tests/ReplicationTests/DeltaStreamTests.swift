import Foundation
import QuiesceCore
import QuiesceReplication
import QuiesceTestSupport
import Testing

/// The stream and the store without a datastore: full streams (no base clone needed)
/// built from known chunks, received into a store in a temporary directory.
@Suite struct DeltaStreamTests {
    static let imageSize: UInt64 = 3 << 20
    static let checkpoint = "20261125T120000000Z"

    /// Data at 0 and 2 MiB, a zeroed range between, the rest a hole.
    static func chunks() -> [DeltaChunk] {
        var generator = SystemRandomNumberGenerator()
        let first = (0..<(256 << 10)).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let second = [UInt8](repeating: 0x5a, count: 512 << 10)  // compresses well
        return [
            DeltaChunk(kind: .data, offset: 0, length: UInt64(first.count), payload: first),
            DeltaChunk(kind: .zero, offset: 1 << 20, length: 64 << 10),
            DeltaChunk(kind: .data, offset: 2 << 20, length: UInt64(second.count), payload: second),
        ]
    }

    static func expectedImage(_ chunks: [DeltaChunk]) -> [UInt8] {
        var image = [UInt8](repeating: 0, count: Int(imageSize))
        for chunk in chunks where chunk.kind == .data {
            image.replaceSubrange(Int(chunk.offset)..<Int(chunk.end), with: chunk.payload!)
        }
        return image
    }

    static func stream(_ chunks: [DeltaChunk], header: DeltaStreamHeader? = nil, compression: Int32? = nil) throws -> [UInt8] {
        let sink = MemorySink()
        let destination = PipeDestination(name: "memory", sink: sink, compressionLevel: compression)
        var header = header ?? DeltaStreamHeader(volume: "vm1", imageSize: imageSize, base: nil, target: checkpoint)
        header.compression = compression == nil ? "none" : "zstd"
        try send(chunks, to: destination, header: header)
        return sink.bytes
    }

    /// Header, one frame per chunk from frame 0, trailer.
    static func send(_ chunks: [DeltaChunk], to destination: FrameDestination, header: DeltaStreamHeader) throws {
        var (_, chain) = try destination.begin(header)
        let encoder = FrameEncoder(compressionLevel: destination.compressionLevel)
        var data: UInt64 = 0, zero: UInt64 = 0
        for (sequence, chunk) in chunks.enumerated() {
            let frame = encoder.encode(chunk, sequence: UInt64(sequence))
            try destination.send(frame)
            chain.append(frame.header)
            if chunk.kind == .data { data += chunk.length } else { zero += chunk.length }
        }
        let trailer = DeltaTrailer(frames: UInt64(chunks.count), dataBytes: data, zeroBytes: zero, digest: chain.hex,
                                   manifest: CheckpointRecord(id: header.target, label: nil, startedAt: Date()))
        try destination.sendTrailer(try encoder.trailer(trailer, sequence: UInt64(chunks.count)))
    }

    static func receive(_ bytes: [UInt8], into store: DRStore) throws -> ReceiveSummary {
        try Receiver.receive(from: MemorySource(bytes), into: store, keep: 3)
    }

    static func image(in store: DRStore) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: store.imagePath(volume: "vm1", checkpoint: checkpoint))))
    }

    @Test func fullStreamArrivesByteForByteWithItsManifest() throws {
        try withTemporaryDirectory { directory in
            let store = try DRStore(root: directory + "/store", create: true)
            let chunks = Self.chunks()
            let summary = try Self.receive(try Self.stream(chunks), into: store)
            #expect(summary.frames == 3)
            #expect(summary.dataBytes == (256 + 512) << 10)
            #expect(try Self.image(in: store) == Self.expectedImage(chunks))
            #expect(store.checkpoints(volume: "vm1") == [Self.checkpoint])
            #expect(try store.manifest(volume: "vm1", checkpoint: Self.checkpoint).record.id == Self.checkpoint)
        }
    }

    @Test func compressedStreamIsSmallerAndArrivesTheSame() throws {
        try withTemporaryDirectory { directory in
            let store = try DRStore(root: directory + "/store", create: true)
            let chunks = Self.chunks()
            let plain = try Self.stream(chunks), compressed = try Self.stream(chunks, compression: 3)
            #expect(compressed.count < plain.count - (400 << 10))
            _ = try Self.receive(compressed, into: store)
            #expect(try Self.image(in: store) == Self.expectedImage(chunks))
        }
    }

    @Test func everyFlippedByteIsRefusedAndLeavesNoCheckpoint() throws {
        let stream = try Self.stream(Self.chunks())
        // Header, a frame header, inside data, the trailer: each position must be caught.
        for position in [5, 40, 100, 200, 120_000, stream.count - 300, stream.count - 10] {
            try withTemporaryDirectory { directory in
                let store = try DRStore(root: directory + "/store", create: true)
                var damaged = stream
                damaged[position] ^= 0x01
                #expect(throws: DeltaStreamError.self, "flip at \(position)") { _ = try Self.receive(damaged, into: store) }
                #expect(store.checkpoints(volume: "vm1").isEmpty, "flip at \(position)")
            }
        }
    }

    @Test func truncatedStreamLeavesNoCheckpointAndTheNextRunResumes() throws {
        try withTemporaryDirectory { directory in
            let store = try DRStore(root: directory + "/store", create: true)
            let chunks = Self.chunks()
            let stream = try Self.stream(chunks)
            // Cut inside the third frame: two frames are applied and recorded.
            let cut = stream.count - (300 << 10)
            do {
                _ = try Self.receive(Array(stream[..<cut]), into: store)
                Issue.record("a truncated stream was accepted")
            } catch let error as DeltaStreamError {
                guard case .truncated = error else { Issue.record("expected truncated, got \(error)"); return }
                #expect("\(error)".contains("previous checkpoint is untouched"))
            }
            #expect(store.checkpoints(volume: "vm1").isEmpty)
            #expect(store.partial(volume: "vm1")?.frames == 2)
            let summary = try Self.receive(stream, into: store)
            #expect(summary.resumedAtFrame == 2)
            #expect(try Self.image(in: store) == Self.expectedImage(chunks))
            #expect(store.partial(volume: "vm1") == nil)
        }
    }

    @Test func replayedStreamIsRefused() throws {
        try withTemporaryDirectory { directory in
            let store = try DRStore(root: directory + "/store", create: true)
            let stream = try Self.stream(Self.chunks())
            _ = try Self.receive(stream, into: store)
            #expect { _ = try Self.receive(stream, into: store) } throws: { error in
                guard case .rejected(let text) = error as? DeltaStreamError else { return false }
                return text.contains("replay")
            }
            #expect(store.checkpoints(volume: "vm1") == [Self.checkpoint])
        }
    }

    @Test func deltaForABaseTheStoreLacksIsRefused() throws {
        try withTemporaryDirectory { directory in
            let store = try DRStore(root: directory + "/store", create: true)
            let header = DeltaStreamHeader(volume: "vm1", imageSize: Self.imageSize, base: "20261125T110000000Z",
                                           target: Self.checkpoint)
            #expect { _ = try Self.receive(try Self.stream(Self.chunks(), header: header), into: store) } throws: { error in
                guard case .rejected(let text) = error as? DeltaStreamError else { return false }
                return text.contains("20261125T110000000Z") && text.contains("does not have")
            }
            #expect(store.checkpoints(volume: "vm1").isEmpty)
        }
    }

    @Test func namesWithPathSeparatorsAreRefusedBeforeAnythingIsWritten() throws {
        for volume in ["../etc", "a/b", ".hidden", ""] {
            try withTemporaryDirectory { directory in
                let store = try DRStore(root: directory + "/store", create: true)
                let header = DeltaStreamHeader(volume: volume, imageSize: Self.imageSize, base: nil, target: Self.checkpoint)
                let bytes = try Self.stream(Self.chunks(), header: header)
                #expect(throws: DeltaStreamError.self) { _ = try Self.receive(bytes, into: store) }
                let entries = try FileManager.default.contentsOfDirectory(atPath: store.root)
                #expect(entries == ["quiesce-store.json"], "\(volume): \(entries)")
            }
        }
    }

    @Test func framesBeyondTheImageAreRefused() throws {
        try withTemporaryDirectory { directory in
            let store = try DRStore(root: directory + "/store", create: true)
            let outside = DeltaChunk(kind: .data, offset: Self.imageSize - 10, length: 20, payload: [UInt8](repeating: 1, count: 20))
            #expect { _ = try Self.receive(try Self.stream([outside]), into: store) } throws: { error in
                "\(error)".contains("beyond the image size")
            }
            #expect(store.checkpoints(volume: "vm1").isEmpty)
        }
    }

    @Test func newerFormatVersionIsNamedInTheError() throws {
        var header = DeltaStreamHeader(volume: "vm1", imageSize: Self.imageSize, base: nil, target: Self.checkpoint)
        header.formatVersion = 2
        let bytes = try header.encoded()
        #expect(throws: DeltaStreamError.unsupportedVersion(2)) { _ = try DeltaStreamHeader.read(from: MemorySource(bytes)) }
    }

    @Test func somethingElseIsNotTakenForAStream() throws {
        let bytes = Array("PGDMP this is a pg_dump, not a delta".utf8)
        #expect { _ = try DeltaStreamHeader.read(from: MemorySource(bytes)) } throws: { error in
            "\(error)".contains("not a quiesce delta stream")
        }
    }

    @Test func storeKeepsTheNewestCheckpointsOnly() throws {
        try withTemporaryDirectory { directory in
            let store = try DRStore(root: directory + "/store", create: true)
            let ids = (1...5).map { "20261125T12000\($0)000Z" }
            for id in ids {
                let header = DeltaStreamHeader(volume: "vm1", imageSize: Self.imageSize, base: nil, target: id)
                let summary = try Receiver.receive(from: MemorySource(try Self.stream(Self.chunks(), header: header)),
                                                   into: store, keep: 2)
                #expect(summary.checkpoint == id)
            }
            #expect(store.checkpoints(volume: "vm1") == Array(ids.suffix(2)))
        }
    }

    /// Copies that fail verification never push the newest verified one out of the store:
    /// it stays beyond `keep` until a newer one verifies.
    @Test func retentionKeepsTheNewestVerifiedCheckpointBeyondKeep() throws {
        try withTemporaryDirectory { directory in
            let store = try DRStore(root: directory + "/store", create: true)
            let ids = (1...5).map { "20261125T12000\($0)000Z" }
            func receive(_ id: String) throws {
                let header = DeltaStreamHeader(volume: "vm1", imageSize: Self.imageSize, base: nil, target: id)
                _ = try Receiver.receive(from: MemorySource(try Self.stream(Self.chunks(), header: header)), into: store, keep: 2)
            }
            func record(_ id: String, ok: Bool) throws {
                try Data("{\"ok\": \(ok)}".utf8).write(to: URL(fileURLWithPath: store.verificationPath(volume: "vm1", checkpoint: id)))
            }
            try receive(ids[0])
            try record(ids[0], ok: true)
            for id in ids[1...3] {
                try receive(id)
                try record(id, ok: false)
            }
            #expect(store.checkpoints(volume: "vm1") == [ids[0], ids[2], ids[3]])
            #expect(store.newestVerified(volume: "vm1") == ids[0])
            // A pruned checkpoint's verification record goes with it.
            #expect(!FileManager.default.fileExists(atPath: store.verificationPath(volume: "vm1", checkpoint: ids[1])))

            try record(ids[3], ok: true)
            try receive(ids[4])
            #expect(store.checkpoints(volume: "vm1") == [ids[3], ids[4]])
        }
    }

    @Test func aNonEmptyDirectoryIsNotTurnedIntoAStore() throws {
        try withTemporaryDirectory { directory in
            try Data("precious".utf8).write(to: URL(fileURLWithPath: directory + "/notes.txt"))
            #expect { _ = try DRStore(root: directory, create: true) } throws: { "\($0)".contains("not empty") }
        }
    }
}

final class MemorySink: ByteSink {
    var bytes: [UInt8] = []
    func write(_ buffer: UnsafeRawBufferPointer) throws { bytes += buffer }
}

final class MemorySource: ByteSource {
    private let bytes: [UInt8]
    private var position = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    func read(upTo count: Int) throws -> [UInt8] {
        let end = min(bytes.count, position + count)
        defer { position = end }
        return Array(bytes[position..<end])
    }
}
