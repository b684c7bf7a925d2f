import CQuiesceSys
import Foundation
import QuiesceCore

/// What one applied (or refused) stream did.
public struct ReceiveSummary: Codable, Sendable, Equatable {
    public var volume: String
    public var base: String?
    public var checkpoint: String
    /// The first frame applied by this run: 0, or where a resumed stream picked up.
    public var resumedAtFrame: UInt64
    public var frames: UInt64
    public var dataBytes: UInt64
    public var zeroBytes: UInt64
    public var seconds: Double
    /// Checkpoints the store's retention removed after this one landed.
    public var pruned: [String]
    /// The receiver's verification of the copy (`--verify`), nil when it did not verify.
    public var verification: VerificationOutcome?
}

/// Whether the applications of a received checkpoint started cleanly on a copy.
public struct VerificationOutcome: Codable, Sendable, Equatable {
    public var ok: Bool
    /// One line per failure, naming the writer and the reason.
    public var failures: [String]
    public init(ok: Bool, failures: [String]) {
        self.ok = ok
        self.failures = failures
    }
}

/// Applies one stream to a DR store atomically: onto a reflink clone of its base
/// (`incoming/<id>.partial`), recording durable progress as it goes, and only after the
/// trailer's digest matches: fsync, manifest, rename into place, fsync the directory.
/// Anything short of that leaves the store's checkpoints as they were.
final class DeltaApplier {
    let store: DRStore
    let header: DeltaStreamHeader
    let headerHash: String
    /// Frames already on disk from an earlier, interrupted run of the same stream.
    let resumeFrame: UInt64
    let resumeChain: DigestChain
    private let lock: VolumeLock
    private let partialPath: String
    private let progressPath: String
    private let fd: Int32
    private var progress: ApplyProgress
    private var bytesSinceSync: UInt64 = 0
    private var discarded = false
    private var lastSync = Date()
    private let started = Date()

    /// Durable progress is recorded at least this often (bytes applied, seconds).
    static let syncBytes: UInt64 = 256 << 20
    static let syncInterval: TimeInterval = 2

    /// Checks the header against the store and opens (or resumes) the partial checkpoint.
    init(store: DRStore, header: DeltaStreamHeader, headerBytes: [UInt8]) throws {
        self.store = store
        self.header = header
        var digest = SHA256Digest()
        digest.update(headerBytes)
        headerHash = hex(digest.finish())
        let volume = header.volume
        lock = try store.lock(volume: volume)

        let existing = store.checkpoints(volume: volume)
        if existing.contains(header.target) {
            throw DeltaStreamError.rejected("the store already has checkpoint \(header.target) of volume \(volume): this stream was applied before (a replay); nothing changed")
        }
        if let latest = existing.last, latest > header.target {
            throw DeltaStreamError.rejected("the store has a newer checkpoint of volume \(volume) (\(latest)) than this stream's \(header.target): an old stream replayed; nothing changed")
        }
        if let base = header.base, !existing.contains(base) {
            let has = existing.last.map { "its latest is \($0)" } ?? "it has none"
            throw DeltaStreamError.rejected("this delta applies on checkpoint \(base) of volume \(volume), which the store does not have (\(has)); send a delta from the store's latest checkpoint or a full stream; nothing changed")
        }

        let incoming = store.incomingDirectory(volume)
        partialPath = "\(incoming)/\(header.target).partial"
        progressPath = "\(incoming)/\(header.target).progress.json"
        let previous = ApplyProgress.load(progressPath)
        if let previous, previous.stream == headerHash, FileManager.default.fileExists(atPath: partialPath),
           let chain = DigestChain(hex: previous.chain) {
            progress = previous
            resumeFrame = previous.frames
            resumeChain = chain
            fd = open(partialPath, O_RDWR | O_CLOEXEC)
            guard fd >= 0 else { throw DeltaStreamError.store("cannot open \(partialPath): \(String(cString: strerror(errno)))") }
            return
        }
        // A different stream (or none) was in flight: it can never complete now.
        try? FileManager.default.removeItem(atPath: incoming)
        do { try FileManager.default.createDirectory(atPath: incoming, withIntermediateDirectories: true) } catch {
            throw DeltaStreamError.store("cannot create \(incoming): \(error.localizedDescription)")
        }
        fd = open(partialPath, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw DeltaStreamError.store("cannot create \(partialPath): \(String(cString: strerror(errno)))") }
        if let base = header.base {
            let basePath = store.imagePath(volume: volume, checkpoint: base)
            let source = open(basePath, O_RDONLY | O_CLOEXEC)
            guard source >= 0 else { throw DeltaStreamError.store("cannot open base \(basePath): \(String(cString: strerror(errno)))") }
            defer { close(source) }
            guard quiesce_ficlone(fd, source) == 0 else {
                let reason = String(cString: strerror(errno))
                throw DeltaStreamError.store("cannot reflink-clone \(basePath) (\(reason)); a DR store must be on XFS (reflink=1) or btrfs")
            }
        }
        guard ftruncate(fd, off_t(header.imageSize)) == 0 else {
            throw DeltaStreamError.store("cannot size \(partialPath) to \(header.imageSize) bytes: \(String(cString: strerror(errno)))")
        }
        resumeFrame = 0
        resumeChain = DigestChain(headerBytes: headerBytes)
        progress = ApplyProgress(volume: volume, base: header.base, target: header.target, stream: headerHash,
                                 frames: 0, chain: resumeChain.hex, dataBytes: 0, zeroBytes: 0)
        try recordProgress()
    }

    deinit { close(fd) }

    func write(_ data: [UInt8], at offset: UInt64) throws {
        var done = 0
        while done < data.count {
            let n = data.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, data.count - done, off_t(offset) + off_t(done)) }
            guard n > 0 else {
                let code = errno
                let fix = code == ENOSPC || code == EDQUOT
                    ? " (the previous checkpoint is untouched and what was applied is kept: free space on the DR filesystem, or lower `keep`, then replicate again to resume)"
                    : ""
                throw DeltaStreamError.store("writing \(partialPath) at \(offset): \(String(cString: strerror(code)))" + fix)
            }
            done += n
        }
        progress.dataBytes += UInt64(data.count)
        bytesSinceSync += UInt64(data.count)
    }

    func zero(_ offset: UInt64, length: UInt64) throws {
        if quiesce_punch_hole(fd, offset, length) != 0 {
            guard errno == EOPNOTSUPP else {
                throw DeltaStreamError.store("punching a hole in \(partialPath) at \(offset): \(String(cString: strerror(errno)))")
            }
            let zeros = [UInt8](repeating: 0, count: 1 << 20)
            var at = offset
            while at < offset + length {
                let n = Int(min(UInt64(zeros.count), offset + length - at))
                try write(Array(zeros[0..<n]), at: at)
                at += UInt64(n)
            }
            progress.dataBytes -= length
        }
        progress.zeroBytes += length
    }

    /// Frame `sequence` is applied and the chain reached `chain`: record it, durably when due.
    func applied(through sequence: UInt64, chain: DigestChain) throws {
        progress.frames = sequence + 1
        progress.chain = chain.hex
        if bytesSinceSync >= Self.syncBytes || Date().timeIntervalSince(lastSync) >= Self.syncInterval {
            try makeDurable()
        }
    }

    /// fsync what is applied and record it, so a resumed stream starts after it.
    func makeDurable() throws {
        guard !discarded else { return }
        guard fdatasync(fd) == 0 else { throw DeltaStreamError.store("fsync \(partialPath): \(String(cString: strerror(errno)))") }
        try recordProgress()
        bytesSinceSync = 0
        lastSync = Date()
    }

    /// Throws away the partial checkpoint: what it holds can no longer be trusted.
    func discard() {
        discarded = true
        try? FileManager.default.removeItem(atPath: progressPath)
        try? FileManager.default.removeItem(atPath: partialPath)
    }

    private func recordProgress() throws {
        try Durable.write([UInt8](try JSONEncoder().encode(progress)), to: progressPath)
    }

    /// The trailer arrived: check it against what was applied, then publish the checkpoint.
    func finish(_ trailer: DeltaTrailer, frames: UInt64, chain: DigestChain, keep: Int) throws -> ReceiveSummary {
        guard trailer.frames == frames else {
            throw DeltaStreamError.corrupted("the trailer counts \(trailer.frames) frames, \(frames) arrived")
        }
        guard trailer.digest == chain.hex else {
            discard()
            throw DeltaStreamError.corrupted("the stream's digest does not match its trailer (\(chain.hex.prefix(16))… ≠ \(trailer.digest.prefix(16))…)")
        }
        guard trailer.manifest.id == header.target else {
            throw DeltaStreamError.malformed("the trailer's manifest is for checkpoint \(trailer.manifest.id), the stream for \(header.target)")
        }
        guard fsync(fd) == 0 else { throw DeltaStreamError.store("fsync \(partialPath): \(String(cString: strerror(errno)))") }
        fchmod(fd, 0o444)
        let stored = StoredCheckpoint(volume: header.volume, checkpoint: header.target, base: header.base,
                                      imageSize: header.imageSize, receivedAt: Date(), digest: trailer.digest,
                                      frames: frames, dataBytes: trailer.dataBytes, zeroBytes: trailer.zeroBytes,
                                      record: trailer.manifest, environment: trailer.environment)
        let volume = header.volume
        try Durable.write([UInt8](try StoredCheckpoint.encoder.encode(stored)),
                          to: store.manifestPath(volume: volume, checkpoint: header.target), mode: 0o600)
        let finalPath = store.imagePath(volume: volume, checkpoint: header.target)
        guard rename(partialPath, finalPath) == 0 else {
            throw DeltaStreamError.store("rename \(partialPath) → \(finalPath): \(String(cString: strerror(errno)))")
        }
        try Durable.syncDirectory(store.volumeDirectory(volume))
        try? FileManager.default.removeItem(atPath: progressPath)
        let pruned = try store.prune(volume: volume, keep: keep, protected: [header.target])
        return ReceiveSummary(volume: volume, base: header.base, checkpoint: header.target, resumedAtFrame: resumeFrame,
                              frames: frames, dataBytes: trailer.dataBytes, zeroBytes: trailer.zeroBytes,
                              seconds: Date().timeIntervalSince(started), pruned: pruned)
    }
}
