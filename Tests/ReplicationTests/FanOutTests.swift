import Foundation
import QuiesceCore
@testable import QuiesceReplication
import QuiesceTestSupport
import Synchronization
import Testing

/// One read for every target, but a slow target does not pace a fast one: it falls behind,
/// is detached, and gets the rest of its stream from a second read. Every stream stays whole.
@Suite struct FanOutTests {
    static let frame = 64 << 10
    static let frames = 48

    /// An image with data in every other 64 KiB block, and those blocks as the delta.
    static func plan(in directory: String) throws -> (DeltaPlan, [UInt8]) {
        // One read of the kernel's generator: no byte-by-byte work on the test pool's threads.
        let bytes = [UInt8](try #require(FileHandle(forReadingAtPath: "/dev/urandom")).readData(ofLength: 2 * frames * frame))
        let image = directory + "/target.img"
        try Data(bytes).write(to: URL(fileURLWithPath: image))
        let ranges = (0..<frames).map { ChangedRange(offset: UInt64(2 * $0 * frame), length: UInt64(frame), kind: .data) }
        var expected = [UInt8](repeating: 0, count: bytes.count)
        for range in ranges { expected.replaceSubrange(Int(range.offset)..<Int(range.end), with: bytes[Int(range.offset)..<Int(range.end)]) }
        let plan = DeltaPlan(volume: "vm1", targetImage: image, baseImage: nil, base: nil,
                             manifest: CheckpointRecord(id: DeltaStreamTests.checkpoint, label: nil, startedAt: Date()),
                             ranges: ranges, frameBytes: frame)
        return (plan, expected)
    }

    @Test func aSlowTargetIsDetachedAndTheFastOneFinishesFirstWithBothStreamsWhole() throws {
        try withTemporaryDirectory { directory in
            let (plan, expected) = try Self.plan(in: directory)
            let fast = RecordingDestination(name: "fast")
            let slow = RecordingDestination(name: "slow", delayPerFrame: 0.02)
            let report = try DeltaSender.send(plan, to: [fast, slow], laneBuffer: 4 * Self.frame)

            #expect(report.destinations.allSatisfy { $0.error == nil }, "\(report.destinations.map(\.error))")
            #expect(report.destinations[0].rereadFromFrame == nil)
            let detachedAt = try #require(report.destinations[1].rereadFromFrame, "the slow target was never detached")
            // The fast target had its trailer while the slow one still got frames (sending in
            // step, it would come after the slow one's last frame). How many depends on load.
            let fastDone = try #require(fast.trailerAt), slowFrames = slow.frameTimes
            #expect(slowFrames.contains { $0 > fastDone }, "the fast target waited for the slow one")
            // What was read: everything once, and again from where the slow one fell behind.
            #expect(report.bytesRead == UInt64(2 * Self.frames - Int(detachedAt)) * UInt64(Self.frame))

            for (index, destination) in [fast, slow].enumerated() {
                let store = try DRStore(root: "\(directory)/store-\(index)", create: true)
                let summary = try Receiver.receive(from: MemorySource(destination.bytes), into: store, keep: 1)
                #expect(summary.frames == UInt64(Self.frames), "\(destination.name)")
                let image = try Data(contentsOf: URL(fileURLWithPath: store.imagePath(volume: "vm1", checkpoint: DeltaStreamTests.checkpoint)))
                #expect([UInt8](image) == expected, "\(destination.name)'s copy differs")
            }
        }
    }

    @Test func aTargetFailingMidStreamIsReportedAndTheOtherCompletes() throws {
        try withTemporaryDirectory { directory in
            let (plan, expected) = try Self.plan(in: directory)
            let healthy = RecordingDestination(name: "healthy")
            let broken = RecordingDestination(name: "broken", failAtFrame: 10)
            let report = try DeltaSender.send(plan, to: [broken, healthy])
            #expect(report.destinations[0].error?.contains("frame 10 refused") == true, "\(report.destinations[0])")
            #expect(report.destinations[1].error == nil)
            let store = try DRStore(root: "\(directory)/store", create: true)
            _ = try Receiver.receive(from: MemorySource(healthy.bytes), into: store, keep: 1)
            let image = try Data(contentsOf: URL(fileURLWithPath: store.imagePath(volume: "vm1", checkpoint: DeltaStreamTests.checkpoint)))
            #expect([UInt8](image) == expected)
        }
    }
}

/// A pipe-like destination that keeps what it was sent, with when; optionally slow or failing.
final class RecordingDestination: FrameDestination, @unchecked Sendable {
    let name: String
    let compressionLevel: Int32? = nil
    private let delayPerFrame: Double
    private let failAtFrame: Int?
    private let state = Mutex<(bytes: [UInt8], frameTimes: [Date], trailerAt: Date?, frames: Int)>(([], [], nil, 0))

    init(name: String, delayPerFrame: Double = 0, failAtFrame: Int? = nil) {
        self.name = name
        self.delayPerFrame = delayPerFrame
        self.failAtFrame = failAtFrame
    }

    var bytes: [UInt8] { state.withLock { $0.bytes } }
    var frameTimes: [Date] { state.withLock { $0.frameTimes } }
    var trailerAt: Date? { state.withLock { $0.trailerAt } }
    var bytesSent: UInt64 { UInt64(bytes.count) }

    func begin(_ header: DeltaStreamHeader) throws -> (frame: UInt64, chain: DigestChain) {
        let encoded = try header.encoded()
        state.withLock { $0.bytes += encoded }
        return (0, DigestChain(headerBytes: encoded))
    }

    func send(_ frame: EncodedFrame) throws {
        if delayPerFrame > 0 { Thread.sleep(forTimeInterval: delayPerFrame) }
        try state.withLock { state in
            if state.frames == failAtFrame { throw DeltaStreamError.transport("\(name): frame \(state.frames) refused") }
            state.frames += 1
            state.bytes += frame.bytes
            state.frameTimes.append(Date())
        }
    }

    func sendTrailer(_ trailer: EncodedFrame) throws {
        state.withLock {
            $0.bytes += trailer.bytes
            $0.trailerAt = Date()
        }
    }

    func awaitApplied() throws -> ReceiveSummary? { nil }
}
