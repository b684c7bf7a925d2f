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
        while let line = try? source.readLine(),
              let reply = try? JSONDecoder().decode(SessionReply.self, from: Data(line.utf8)) {
            if reply.keepalive == true { continue }
            if !reply.ok, let reason = reply.error { return DeltaStreamError.peer(reason) }
            break
        }
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
public enum DeltaSender {
    public static func send(_ plan: DeltaPlan, to destinations: [FrameDestination]) throws -> SendReport {
        let started = Date()
        let size = try imageSize(plan.targetImage)
        let reader = try DeltaReader(target: plan.targetImage, base: plan.baseImage, ranges: plan.ranges,
                                     chunkSize: plan.frameBytes)

        final class Lane {
            let destination: FrameDestination
            var resume: UInt64 = 0
            var chain: DigestChain
            var error: String?
            var applied: ReceiveSummary?
            init(_ destination: FrameDestination, chain: DigestChain) {
                self.destination = destination
                self.chain = chain
            }
        }
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
        // One encoder per compression setting: a frame is compressed once for all who take it.
        var encoders: [Int32: FrameEncoder] = [:]
        let plainEncoder = FrameEncoder(compressionLevel: nil)
        func encoder(_ level: Int32?) -> FrameEncoder {
            guard let level else { return plainEncoder }
            if let existing = encoders[level] { return existing }
            let made = FrameEncoder(compressionLevel: level)
            encoders[level] = made
            return made
        }

        var sequence: UInt64 = 0
        var dataBytes: UInt64 = 0, zeroBytes: UInt64 = 0
        while true {
            let active = lanes.filter { $0.error == nil }
            let needed = active.contains { $0.resume <= sequence }
            guard let chunk = try reader.next(payload: needed) else { break }
            switch chunk.kind {
            case .data: dataBytes += chunk.length
            case .zero: zeroBytes += chunk.length
            }
            var encoded: [Int32?: EncodedFrame] = [:]
            for lane in active where lane.resume <= sequence {
                let level = lane.destination.compressionLevel
                let frame = encoded[level] ?? encoder(level).encode(chunk, sequence: sequence)
                encoded[level] = frame
                do {
                    try lane.destination.send(frame)
                    lane.chain.append(frame.header)
                } catch {
                    lane.error = "\(error)"
                }
            }
            sequence += 1
        }
        for lane in lanes where lane.error == nil {
            do {
                let trailer = DeltaTrailer(frames: sequence, dataBytes: dataBytes, zeroBytes: zeroBytes,
                                           digest: lane.chain.hex, manifest: plan.manifest, environment: plan.environment)
                try lane.destination.sendTrailer(try plainEncoder.trailer(trailer, sequence: sequence))
            } catch {
                lane.error = "\(error)"
            }
        }
        // Every receiver is finishing (and verifying) by now; collect their reports.
        for lane in lanes where lane.error == nil {
            do {
                lane.applied = try lane.destination.awaitApplied()
            } catch {
                lane.error = "\(error)"
            }
        }
        return SendReport(volume: plan.volume, base: plan.base, checkpoint: plan.manifest.id, frames: sequence,
                          dataBytes: dataBytes, zeroBytes: zeroBytes, bytesRead: reader.bytesRead,
                          seconds: Date().timeIntervalSince(started),
                          destinations: lanes.map {
                              .init(name: $0.destination.name, resumedAtFrame: $0.resume, bytesSent: $0.destination.bytesSent,
                                    applied: $0.applied, error: $0.error)
                          })
    }

    static func imageSize(_ path: String) throws -> UInt64 {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw DeltaStreamError.transport("cannot stat snapshot \(path): \(String(cString: strerror(errno)))")
        }
        return UInt64(info.st_size)
    }
}
