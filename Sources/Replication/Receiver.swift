import Foundation
import QuiesceCore

/// Control messages of a session, one JSON object per line. The delta stream itself
/// travels as raw bytes after `{"op":"stream"}`.
struct SessionRequest: Codable {
    var op: String
    var volume: String?
    var version: Int?
    var checkpoint: String?
    var blockSize: Int?
    /// hello: how often the sender wants a keepalive while the receiver works on an answer (seconds).
    var keepalive: Double?
}

struct SessionReply: Codable {
    var ok: Bool
    var error: String?
    var checkpoints: [String]?
    var partial: ApplyProgress?
    var resume: UInt64?
    var chain: String?
    var applied: ReceiveSummary?
    /// Block hashes of a checkpoint image (scrub), hex, concatenated.
    var hashes: String?
    /// Not an answer: the receiver is still working on one (cloning a base, finishing an
    /// apply, verifying, hashing), so the sender's idle timeout starts again.
    var keepalive: Bool?

    static func failure(_ error: Error) -> SessionReply {
        SessionReply(ok: false, error: "\(error)")
    }

    /// The reply as one line of JSON.
    static func line(_ reply: SessionReply) throws -> [UInt8] {
        var line = [UInt8](try JSONEncoder().encode(reply))
        line.append(UInt8(ascii: "\n"))
        return line
    }
}

/// The receiving side: applies streams to a DR store, from a pipe or in a session.
public enum Receiver {
    /// Applies one whole stream (`quiesce send … | quiesce receive`). If an earlier run of
    /// the same stream was interrupted, frames the store already has are checked against
    /// its recorded chain and skipped: the apply continues from the receiver's durable progress.
    /// `verify` runs after a checkpoint landed (the DR side's `--verify`).
    public static func receive(from source: ByteSource, into store: DRStore, keep: Int,
                               verify: ((ReceiveSummary) -> VerificationOutcome)? = nil) throws -> ReceiveSummary {
        let (header, headerBytes) = try DeltaStreamHeader.read(from: source)
        let applier = try DeltaApplier(store: store, header: header, headerBytes: headerBytes)
        let decoder = FrameDecoder(header: header)
        var chain = DigestChain(headerBytes: headerBytes)
        var sequence: UInt64 = 0
        while sequence < applier.resumeFrame {
            switch try decoder.next(from: source, sequence: sequence) {
            case .data(let frame, _), .zero(let frame): chain.append(frame)
            case .trailer: throw DeltaStreamError.malformed("the trailer came at frame \(sequence), before frames the store already has")
            }
            sequence += 1
        }
        guard chain == applier.resumeChain else {
            applier.discard()
            throw DeltaStreamError.corrupted("the first \(sequence) frames differ from the ones already applied to \(header.target)")
        }
        var summary = try apply(from: source, applier: applier, decoder: decoder, chain: chain, keep: keep)
        summary.verification = verify?(summary)
        return summary
    }

    /// Serves one session: answers each `hello` with what the store has, applies each
    /// stream from where the store's durable progress stands, and reports back, until
    /// the sender closes. A failed stream ends the session (its bytes cannot be trusted).
    /// `allowed` limits the volumes this sender (`client`, for messages) may touch.
    public static func serve(source: ByteSource, sink: ByteSink, store: DRStore, keep: Int,
                             verify: ((ReceiveSummary) -> VerificationOutcome)? = nil,
                             allowed: VolumeScope = .all, client: String = "this sender",
                             log: (String) -> Void = { _ in }) throws {
        let heartbeat = Heartbeat(sink: sink)
        func reply(_ message: SessionReply) throws {
            try sink.write(try SessionReply.line(message))
        }
        func permit(_ volume: String) throws {
            guard allowed.allows(volume) else {
                throw DeltaStreamError.rejected("\(client) may not send volume \(volume) to this receiver "
                                                + "(the receiver's `quiesce serve --allow` rules)")
            }
        }
        while let line = try source.readLine() {
            guard let request = try? JSONDecoder().decode(SessionRequest.self, from: Data(line.utf8)) else {
                try reply(.failure(DeltaStreamError.malformed("expected a session request, got \(line.prefix(60))")))
                return
            }
            switch request.op {
            case "hello":
                guard let volume = request.volume else {
                    try reply(.failure(DeltaStreamError.malformed("hello without a volume")))
                    return
                }
                if let seconds = request.keepalive, seconds.isFinite, seconds > 0 { heartbeat.interval = .milliseconds(Int64(seconds * 1000)) }
                do {
                    try DeltaStreamHeader.validateName(volume, what: "volume name")
                    try permit(volume)
                    try reply(SessionReply(ok: true, checkpoints: store.checkpoints(volume: volume), partial: store.partial(volume: volume)))
                } catch {
                    log("refused: \(error)")
                    try reply(.failure(error))
                    return
                }
            case "stream":
                let applier: DeltaApplier
                let decoder: FrameDecoder
                do {
                    let (header, headerBytes) = try DeltaStreamHeader.read(from: source)
                    try permit(header.volume)
                    // Cloning the base (or copying it, without reflinks) may take a while.
                    applier = try heartbeat.beating { try DeltaApplier(store: store, header: header, headerBytes: headerBytes) }
                    decoder = FrameDecoder(header: header)
                } catch {
                    log("refused a stream: \(error)")
                    try reply(.failure(error))
                    return
                }
                try reply(SessionReply(ok: true, resume: applier.resumeFrame, chain: applier.resumeChain.hex))
                do {
                    var summary = try apply(from: source, applier: applier, decoder: decoder, chain: applier.resumeChain, keep: keep,
                                            heartbeat: heartbeat)
                    log("applied \(summary.checkpoint) of \(summary.volume): \(summary.frames - summary.resumedAtFrame) frames")
                    if let verify { summary.verification = heartbeat.beating { verify(summary) } }
                    try reply(SessionReply(ok: true, applied: summary))
                } catch {
                    log("stream for \(applier.header.target) stopped: \(error)")
                    try? reply(.failure(error))
                    return
                }
            case "scrub":
                // Hash the stored image so the sender can compare it with its snapshot.
                guard let volume = request.volume, let checkpoint = request.checkpoint,
                      let blockSize = request.blockSize, (4096...(64 << 20)).contains(blockSize) else {
                    try reply(.failure(DeltaStreamError.malformed("scrub needs a volume, a checkpoint and a block size of 4 KiB…64 MiB")))
                    return
                }
                do {
                    try DeltaStreamHeader.validateName(volume, what: "volume name")
                    try DeltaStreamHeader.validateName(checkpoint, what: "checkpoint id")
                    try permit(volume)
                    guard store.checkpoints(volume: volume).contains(checkpoint) else {
                        throw DeltaStreamError.rejected("the store has no checkpoint \(checkpoint) of volume \(volume)")
                    }
                    let image = store.imagePath(volume: volume, checkpoint: checkpoint)
                    let hashes = try heartbeat.beating { try BlockHashes.compute(image, blockSize: blockSize) }
                    try reply(SessionReply(ok: true, hashes: BlockHashes.encode(hashes)))
                } catch {
                    try reply(.failure(error))
                    return
                }
            case "bye":
                return
            default:
                try reply(.failure(DeltaStreamError.malformed("unknown session request \"\(request.op)\"")))
                return
            }
        }
    }

    /// Applies frames from `applier.resumeFrame` on; on any failure makes what was applied
    /// durable (so the next run resumes after it) and rethrows.
    static func apply(from source: ByteSource, applier: DeltaApplier, decoder: FrameDecoder, chain start: DigestChain,
                      keep: Int, heartbeat: Heartbeat? = nil) throws -> ReceiveSummary {
        var chain = start
        var sequence = applier.resumeFrame
        do {
            while true {
                switch try decoder.next(from: source, sequence: sequence) {
                case .data(let frame, let bytes):
                    try applier.write(bytes, at: frame.offset)
                    chain.append(frame)
                    try applier.applied(through: sequence, chain: chain)
                case .zero(let frame):
                    try applier.zero(frame.offset, length: frame.length)
                    chain.append(frame)
                    try applier.applied(through: sequence, chain: chain)
                case .trailer(_, let trailer):
                    // The digest check, fsyncs and renames: the sender waits for the answer meanwhile.
                    let finish = { try applier.finish(trailer, frames: sequence, chain: chain, keep: keep) }
                    return try heartbeat.map { try $0.beating(finish) } ?? finish()
                }
                sequence += 1
            }
        } catch {
            try? applier.makeDurable()
            throw error
        }
    }
}
