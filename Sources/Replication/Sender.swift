import Foundation
import QuiesceCore

/// What a receiver has for a volume, as it answered `hello`.
public struct ReceiverState: Sendable {
    public var checkpoints: [String]
    public var partial: ApplyProgress?
    public var latest: String? { checkpoints.last }
}

/// Where a stream's frames go: a pipe (`quiesce send` to stdout) or a receiver session.
public protocol FrameDestination: AnyObject {
    /// Names the destination in errors and reports.
    var name: String { get }
    /// zstd level for data frames, nil for none.
    var compressionLevel: Int32? { get }
    /// Sends the header; returns the frame to start from and the chain value there, as
    /// the receiver's durable progress says (0 and the header's chain for a pipe).
    func begin(_ header: DeltaStreamHeader) throws -> (frame: UInt64, chain: DigestChain)
    func send(_ frame: EncodedFrame) throws
    /// Sends the trailer. The report is read apart (`awaitApplied`), so that every target
    /// gets its trailer first and finishes (and verifies) side by side with the others.
    func sendTrailer(_ trailer: EncodedFrame) throws
    /// A session's receiver report on the stream; nil for a pipe.
    func awaitApplied() throws -> ReceiveSummary?
    /// Bytes written so far.
    var bytesSent: UInt64 { get }
}

/// A stream written to a pipe or file, start to end.
public final class PipeDestination: FrameDestination {
    public let name: String
    public let compressionLevel: Int32?
    private let sink: CountingSink

    public init(name: String, sink: ByteSink, compressionLevel: Int32?) {
        self.name = name
        self.sink = CountingSink(sink)
        self.compressionLevel = compressionLevel
    }

    public func begin(_ header: DeltaStreamHeader) throws -> (frame: UInt64, chain: DigestChain) {
        let bytes = try header.encoded()
        try sink.write(bytes)
        return (0, DigestChain(headerBytes: bytes))
    }

    public func send(_ frame: EncodedFrame) throws { try sink.write(frame.bytes) }
    public func sendTrailer(_ trailer: EncodedFrame) throws { try sink.write(trailer.bytes) }
    public func awaitApplied() throws -> ReceiveSummary? { nil }
    public var bytesSent: UInt64 { sink.count }
}

/// A session with a `quiesce receive --session` (local, over ssh, or behind TLS).
public final class ReceiverSession: FrameDestination {
    public let name: String
    public let compressionLevel: Int32?
    private let source: ByteSource
    private let sink: CountingSink
    private let onClose: () -> Void
    private let diagnostics: () -> String
    /// How often the receiver should show it is alive while it works on an answer.
    private let keepaliveInterval: Duration?

    /// `sink` may be rate-limited; `onClose` closes the pipe and reaps the peer;
    /// `diagnostics` says what the peer printed (ssh's complaint, say) when it went away.
    /// `idleTimeout` is the one `source` and `sink` enforce: the receiver is asked for a
    /// keepalive four times within it while it works.
    public init(name: String, source: ByteSource, sink: ByteSink, compressionLevel: Int32?, idleTimeout: Duration? = nil,
                diagnostics: @escaping () -> String = { "" }, onClose: @escaping () -> Void) {
        self.name = name
        self.keepaliveInterval = idleTimeout.map { $0 / 4 }
        self.source = source
        self.sink = CountingSink(sink)
        self.compressionLevel = compressionLevel
        self.diagnostics = diagnostics
        self.onClose = onClose
    }

    public var bytesSent: UInt64 { sink.count }

    public func hello(volume: String) throws -> ReceiverState {
        try request(SessionRequest(op: "hello", volume: volume, version: DeltaStreamHeader.currentVersion,
                                   keepalive: keepaliveInterval?.seconds))
        let reply = try readReply("hello")
        return ReceiverState(checkpoints: reply.checkpoints ?? [], partial: reply.partial)
    }

    public func begin(_ header: DeltaStreamHeader) throws -> (frame: UInt64, chain: DigestChain) {
        try request(SessionRequest(op: "stream"))
        try sink.write(try header.encoded())
        let reply = try readReply("the stream header")
        guard let resume = reply.resume, let chainText = reply.chain, let chain = DigestChain(hex: chainText) else {
            throw DeltaStreamError.malformed("\(name) answered the header without a resume point")
        }
        return (resume, chain)
    }

    public func send(_ frame: EncodedFrame) throws {
        do { try sink.write(frame.bytes) } catch { throw explained(error) }
    }

    public func sendTrailer(_ trailer: EncodedFrame) throws {
        do { try sink.write(trailer.bytes) } catch { throw explained(error) }
    }

    /// A receiver that fails a stream (a full disk, a bad frame) says why, then stops reading:
    /// the sender sees only a closed pipe. Its last answer, or what it printed, is the reason.
    private func explained(_ error: Error) -> Error {
        guard let streamError = error as? DeltaStreamError, case .transport(let text) = streamError else { return error }
        do {
            _ = try readReply("the stream")
        } catch let refusal as DeltaStreamError {
            if case .peer = refusal { return refusal }
        } catch {}
        let said = diagnostics()
        return DeltaStreamError.transport(text + (said.isEmpty ? "" : ": \(said)")
            + " (the receiver stopped or the connection was cut; it keeps what it made durable, and the next "
            + "`quiesce replicate` resumes from there)")
    }

    public func awaitApplied() throws -> ReceiveSummary? {
        let reply = try readReply("the trailer")
        guard let applied = reply.applied else { throw DeltaStreamError.malformed("\(name) did not report the applied checkpoint") }
        return applied
    }

    /// Asks the receiver to hash its copy of `checkpoint`; read the answer with `scrubResult`
    /// (hash the local snapshot in between: both sides read at once).
    public func requestScrub(volume: String, checkpoint: String, blockSize: Int) throws {
        try request(SessionRequest(op: "scrub", volume: volume, checkpoint: checkpoint, blockSize: blockSize))
    }

    public func scrubResult() throws -> [Checksum128] {
        let reply = try readReply("the scrub", lineLimit: 512 << 20)
        guard let text = reply.hashes, let hashes = BlockHashes.decode(text) else {
            throw DeltaStreamError.malformed("\(name) answered the scrub without valid block hashes")
        }
        return hashes
    }

    /// Ends the session politely, then closes the pipe.
    public func close() {
        try? request(SessionRequest(op: "bye"))
        onClose()
    }

    private func request(_ message: SessionRequest) throws {
        var line = [UInt8](try JSONEncoder().encode(message))
        line.append(UInt8(ascii: "\n"))
        try sink.write(line)
    }

    private func readReply(_ what: String, lineLimit: Int = 1 << 20) throws -> SessionReply {
        while true {
            guard let line = try source.readLine(limit: lineLimit) else {
                let said = diagnostics()
                throw DeltaStreamError.transport("\(name) closed the connection while answering \(what)" + (said.isEmpty ? "" : ": \(said)"))
            }
            guard let reply = try? JSONDecoder().decode(SessionReply.self, from: Data(line.utf8)) else {
                throw DeltaStreamError.malformed("\(name) answered \(what) with \(line.prefix(80)) (is the remote quiesce the same version?)")
            }
            if reply.keepalive == true { continue }
            guard reply.ok else { throw DeltaStreamError.peer(reply.error ?? "unspecified error") }
            return reply
        }
    }
}

/// One delta to send: which snapshots, which ranges, and the checkpoint's manifest.
public struct DeltaPlan: Sendable {
    public var volume: String
    public var targetImage: String
    public var baseImage: String?
    public var base: String?
    public var manifest: CheckpointRecord
    public var environment: CheckpointEnvironment?
    public var ranges: [ChangedRange]
    public var frameBytes: Int

    public init(volume: String, targetImage: String, baseImage: String?, base: String?, manifest: CheckpointRecord,
                environment: CheckpointEnvironment? = nil,
                ranges: [ChangedRange], frameBytes: Int = DeltaStreamHeader.defaultFrameBytes) {
        self.environment = environment
        self.volume = volume
        self.targetImage = targetImage
        self.baseImage = baseImage
        self.base = base
        self.manifest = manifest
        self.ranges = ranges
        self.frameBytes = frameBytes
    }
}

/// What sending one delta did, in total and per destination.
public struct SendReport: Sendable {
    public struct Destination: Sendable {
        public var name: String
        public var resumedAtFrame: UInt64
        public var bytesSent: UInt64
        /// The receiver's report (sessions), or nil for a pipe.
        public var applied: ReceiveSummary?
        public var error: String?
        /// It fell behind the others and got the stream from this frame on from a second read.
        public var rereadFromFrame: UInt64?
    }
    public var volume: String
    public var base: String?
    public var checkpoint: String
    public var frames: UInt64
    public var dataBytes: UInt64
    public var zeroBytes: UInt64
    /// Bytes read from the snapshots (target, and base for compared ranges).
    public var bytesRead: UInt64
    public var seconds: Double
    public var destinations: [Destination]
}

/// Reads a delta once and streams it to every destination, each from its own resume
/// point. A destination that fails is dropped; the others go on.
///
/// With several destinations each gets its frames through a queue of its own (at most
/// `laneBuffer` bytes), so a slow one (a WAN link) does not pace a fast one (a local store).
/// A destination that falls that far behind is detached: the others finish (trailer and
/// answer) at their own pace, then the detached ones get the rest of the stream from a second
/// read of the snapshots, from the frame where each fell behind. Only they cost a re-read.
public enum DeltaSender {
    public static let defaultLaneBuffer = 64 << 20

    public static func send(_ plan: DeltaPlan, to destinations: [FrameDestination],
                            laneBuffer: Int = DeltaSender.defaultLaneBuffer) throws -> SendReport {
        let started = Date()
        let size = try imageSize(plan.targetImage)
        var lanes: [Lane] = []
        for destination in destinations {
            let header = DeltaStreamHeader(volume: plan.volume, imageSize: size, base: plan.base, target: plan.manifest.id,
                                           maxFrameBytes: plan.frameBytes,
                                           compression: destination.compressionLevel == nil ? "none" : "zstd")
            let lane = Lane(destination, chain: DigestChain(headerBytes: []))
            do {
                (lane.resume, lane.chain) = try destination.begin(header)
            } catch {
                lane.error = "\(error)"
            }
            lanes.append(lane)
        }
        let queued = lanes.count > 1
        if queued {
            for lane in lanes where lane.error == nil { lane.writer = LaneWriter(lane.destination, capacity: laneBuffer) }
        }
        // A failed read ends the send: no writer thread outlives it.
        defer { for lane in lanes { lane.writer?.abandon() } }

        // The first pass: every lane, queued lanes detached when they fall behind.
        for lane in lanes { lane.start = lane.resume }
        var pass = try stream(plan, to: lanes, detaching: queued)
        var bytesRead = pass.bytesRead
        let kept = lanes.filter { $0.detachedAt == nil }
        for lane in kept { lane.finishWriting() }
        sendTrailers(kept, pass, plan)

        // The detached lanes: the rest of their stream from a second read, in step with each
        // other, while the others apply (and verify) what they got.
        let detached = lanes.filter { $0.detachedAt != nil }
        if !detached.isEmpty {
            for lane in detached {
                lane.finishWriting()
                lane.start = max(lane.resume, lane.detachedAt!)
            }
            pass = try stream(plan, to: detached, detaching: false)
            bytesRead += pass.bytesRead
            sendTrailers(detached, pass, plan)
        }
        awaitAnswers(lanes)
        return SendReport(volume: plan.volume, base: plan.base, checkpoint: plan.manifest.id, frames: pass.frames,
                          dataBytes: pass.dataBytes, zeroBytes: pass.zeroBytes, bytesRead: bytesRead,
                          seconds: Date().timeIntervalSince(started),
                          destinations: lanes.map {
                              .init(name: $0.destination.name, resumedAtFrame: $0.resume, bytesSent: $0.destination.bytesSent,
                                    applied: $0.applied, error: $0.error, rereadFromFrame: $0.detachedAt)
                          })
    }

    /// One destination's progress through the stream.
    final class Lane {
        let destination: FrameDestination
        var resume: UInt64 = 0
        /// The first frame it takes in the current pass.
        var start: UInt64 = 0
        var chain: DigestChain
        var error: String?
        var applied: ReceiveSummary?
        /// Frames go through this queue (several destinations); nil: sent in the reading thread.
        var writer: LaneWriter?
        /// The first frame this lane did not get in the first pass (it fell behind).
        var detachedAt: UInt64?

        init(_ destination: FrameDestination, chain: DigestChain) {
            self.destination = destination
            self.chain = chain
        }

        /// Waits for the queued frames to be sent (or to fail), then sends directly.
        func finishWriting() {
            guard let writer else { return }
            if let failure = writer.finish(), error == nil { error = failure }
            self.writer = nil
        }
    }

    /// What one pass read: the whole stream's totals (from frame 0), and what it read from disk.
    struct Pass {
        var frames: UInt64 = 0
        var dataBytes: UInt64 = 0
        var zeroBytes: UInt64 = 0
        var bytesRead: UInt64 = 0
    }

    /// Reads the delta and gives each lane the frames from its `start` on. With `detaching`, a
    /// lane whose queue is full stops getting frames (`detachedAt`).
    static func stream(_ plan: DeltaPlan, to lanes: [Lane], detaching: Bool) throws -> Pass {
        let reader = try DeltaReader(target: plan.targetImage, base: plan.baseImage, ranges: plan.ranges,
                                     chunkSize: plan.frameBytes)
        // One encoder per compression setting: a frame is compressed once for all who take it.
        var encoders: [Int32?: FrameEncoder] = [:]
        var pass = Pass()
        var sequence: UInt64 = 0
        while true {
            let takers = lanes.filter { lane in
                lane.error == nil && lane.start <= sequence && lane.writer?.failure == nil
                    && !(detaching && lane.detachedAt != nil)
            }
            guard let chunk = try reader.next(payload: !takers.isEmpty) else { break }
            switch chunk.kind {
            case .data: pass.dataBytes += chunk.length
            case .zero: pass.zeroBytes += chunk.length
            }
            var encoded: [Int32?: EncodedFrame] = [:]
            for lane in takers {
                let level = lane.destination.compressionLevel
                let frame = encoded[level] ?? {
                    let encoder = encoders[level] ?? FrameEncoder(compressionLevel: level)
                    encoders[level] = encoder
                    return encoder.encode(chunk, sequence: sequence)
                }()
                encoded[level] = frame
                if let writer = lane.writer {
                    // A full queue is only falling behind when another target is waiting for
                    // frames; if all are busy, the reader waits instead.
                    var queued = writer.offer(frame)
                    while !queued {
                        let others = lanes.filter { $0 !== lane && $0.detachedAt == nil && $0.error == nil }
                            .compactMap(\.writer).filter { $0.failure == nil }
                        if others.contains(where: \.isIdle) { break }
                        writer.waitForSpace(upTo: .milliseconds(20))
                        queued = writer.offer(frame)
                    }
                    guard queued else {
                        lane.detachedAt = sequence
                        continue
                    }
                    lane.chain.append(frame.header)
                } else {
                    do {
                        try lane.destination.send(frame)
                        lane.chain.append(frame.header)
                    } catch {
                        lane.error = "\(error)"
                    }
                }
            }
            sequence += 1
        }
        pass.frames = sequence
        pass.bytesRead = reader.bytesRead
        return pass
    }

    /// Sends every lane its trailer; the answers are collected later (`awaitAnswers`), so the
    /// receivers finish (and verify) side by side.
    static func sendTrailers(_ lanes: [Lane], _ pass: Pass, _ plan: DeltaPlan) {
        let plainEncoder = FrameEncoder(compressionLevel: nil)
        for lane in lanes where lane.error == nil {
            do {
                let trailer = DeltaTrailer(frames: pass.frames, dataBytes: pass.dataBytes, zeroBytes: pass.zeroBytes,
                                           digest: lane.chain.hex, manifest: plan.manifest, environment: plan.environment)
                try lane.destination.sendTrailer(try plainEncoder.trailer(trailer, sequence: pass.frames))
            } catch {
                lane.error = "\(error)"
            }
        }
    }

    static func awaitAnswers(_ lanes: [Lane]) {
        for lane in lanes where lane.error == nil {
            do {
                lane.applied = try lane.destination.awaitApplied()
            } catch {
                lane.error = "\(error)"
            }
        }
    }

    static func imageSize(_ path: String) throws -> UInt64 {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw DeltaStreamError.transport("cannot stat snapshot \(path): \(String(cString: strerror(errno)))")
        }
        return UInt64(info.st_size)
    }
}
