import CQuiesceSys
import Foundation
import QuiesceCore

/// A DR store: the checkpoints a receiver has applied, per volume, each a whole image.
///
/// ```
/// STORE/quiesce-store.json                  marks the directory as a store (format 1)
/// STORE/<volume>/<id>.img                   a received checkpoint (reflink clones share extents)
/// STORE/<volume>/<id>.manifest.json         its manifest: writers, markers, recovery metadata
/// STORE/<volume>/incoming/<id>.partial      the checkpoint being applied
/// STORE/<volume>/incoming/<id>.progress.json  its durable progress (frames and chain)
/// STORE/<volume>/.lock                      one receiver per volume at a time
/// ```
///
/// A checkpoint exists once its `.img` exists; its manifest is written before the image
/// is renamed into place, so every checkpoint has one.
public final class DRStore: Sendable {
    public let root: String
    static let markerName = "quiesce-store.json"

    /// Opens the store at `root`, creating it when `create` (an empty or missing directory).
    public init(root: String, create: Bool) throws {
        self.root = root.hasSuffix("/") && root.count > 1 ? String(root.dropLast()) : root
        let marker = "\(self.root)/\(Self.markerName)"
        if FileManager.default.fileExists(atPath: marker) { return }
        guard create else {
            throw DeltaStreamError.store("\(self.root) is not a quiesce DR store (no \(Self.markerName)); receive a checkpoint into it first")
        }
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: self.root, isDirectory: &isDirectory) {
            guard isDirectory.boolValue else { throw DeltaStreamError.store("\(self.root) exists and is not a directory") }
            let entries = (try? FileManager.default.contentsOfDirectory(atPath: self.root)) ?? []
            guard entries.filter({ $0 != "lost+found" }).isEmpty else {
                throw DeltaStreamError.store("\(self.root) is not empty and is not a quiesce DR store; give an empty directory")
            }
        }
        do {
            try FileManager.default.createDirectory(atPath: self.root, withIntermediateDirectories: true)
            try Durable.write(Array(#"{"format":1}"#.utf8), to: marker)
        } catch let error as DeltaStreamError {
            throw error
        } catch {
            throw DeltaStreamError.store("cannot create \(self.root): \(error.localizedDescription)")
        }
    }

    public func volumeDirectory(_ volume: String) -> String { "\(root)/\(volume)" }
    public func imagePath(volume: String, checkpoint: String) -> String { "\(root)/\(volume)/\(checkpoint).img" }
    public func manifestPath(volume: String, checkpoint: String) -> String { "\(root)/\(volume)/\(checkpoint).manifest.json" }
    /// Where `dr verify` (and `--verify` on receipt) records how a checkpoint's copy verified.
    public func verificationPath(volume: String, checkpoint: String) -> String { "\(root)/\(volume)/\(checkpoint).verify.json" }

    /// The newest checkpoint of the volume whose recorded verification passed, if any.
    public func newestVerified(volume: String) -> String? {
        struct Verdict: Decodable { var ok: Bool }
        return checkpoints(volume: volume).reversed().first { id in
            guard let data = FileManager.default.contents(atPath: verificationPath(volume: volume, checkpoint: id)) else { return false }
            return (try? JSONDecoder().decode(Verdict.self, from: data))?.ok == true
        }
    }
    func incomingDirectory(_ volume: String) -> String { "\(root)/\(volume)/incoming" }

    /// The volumes that have at least one checkpoint, by name.
    public func volumes() -> [String] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        return entries.filter { !checkpoints(volume: $0).isEmpty }.sorted()
    }

    /// The volume's checkpoints, oldest first.
    public func checkpoints(volume: String) -> [String] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: volumeDirectory(volume))) ?? []
        return entries.compactMap { name -> String? in
            guard name.hasSuffix(".img") else { return nil }
            let id = String(name.dropLast(4))
            return CheckpointRecord.isValidID(id) ? id : nil
        }.sorted()
    }

    public func latest(volume: String) -> String? { checkpoints(volume: volume).last }

    /// The manifest received with a checkpoint.
    public func manifest(volume: String, checkpoint: String) throws -> StoredCheckpoint {
        let path = manifestPath(volume: volume, checkpoint: checkpoint)
        guard let data = FileManager.default.contents(atPath: path) else {
            throw DeltaStreamError.store("no manifest for checkpoint \(checkpoint) of volume \(volume) (\(path))")
        }
        do { return try StoredCheckpoint.decoder.decode(StoredCheckpoint.self, from: data) } catch {
            throw DeltaStreamError.store("\(path) is not a valid manifest: \(error)")
        }
    }

    /// A stream being applied to this store, if any: what it is and how far it got.
    public func partial(volume: String) -> ApplyProgress? {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: incomingDirectory(volume))) ?? []
        for name in entries where name.hasSuffix(".progress.json") {
            if let progress = ApplyProgress.load("\(incomingDirectory(volume))/\(name)") { return progress }
        }
        return nil
    }

    /// Deletes all but the newest `keep` checkpoints of the volume; returns what it removed.
    /// `protected` checkpoints are kept regardless, and so is the newest one that verified:
    /// newer copies that failed verification (or are not verified yet) never leave the store
    /// without a copy known to start, the one `failover promote` would use.
    @discardableResult
    public func prune(volume: String, keep: Int, protected: Set<String> = []) throws -> [String] {
        let all = checkpoints(volume: volume)
        guard keep >= 1, all.count > keep else { return [] }
        let kept = protected.union(newestVerified(volume: volume).map { [$0] } ?? [])
        var removed: [String] = []
        for id in all.dropLast(keep) where !kept.contains(id) {
            // Image first: without it the checkpoint no longer exists, a stray manifest is harmless.
            try? FileManager.default.removeItem(atPath: imagePath(volume: volume, checkpoint: id))
            try? FileManager.default.removeItem(atPath: manifestPath(volume: volume, checkpoint: id))
            try? FileManager.default.removeItem(atPath: verificationPath(volume: volume, checkpoint: id))
            removed.append(id)
        }
        try Durable.syncDirectory(volumeDirectory(volume))
        return removed
    }

    /// Takes the volume's lock for one receive; a second receiver gets a clear error at once.
    func lock(volume: String) throws -> VolumeLock {
        let directory = volumeDirectory(volume)
        do { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) } catch {
            throw DeltaStreamError.store("cannot create \(directory): \(error.localizedDescription)")
        }
        let path = "\(directory)/.lock"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw DeltaStreamError.store("cannot open \(path): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw DeltaStreamError.store("another receive is applying to volume \(volume) in \(root); try again when it ends")
        }
        return VolumeLock(fd: fd)
    }
}

/// Held while a receive applies to one volume.
final class VolumeLock {
    private let fd: Int32
    init(fd: Int32) { self.fd = fd }
    deinit { close(fd) }
}

/// A received checkpoint's manifest as the store keeps it.
public struct StoredCheckpoint: Codable, Sendable, Equatable {
    public var volume: String
    public var checkpoint: String
    public var base: String?
    public var imageSize: UInt64
    public var receivedAt: Date
    /// The stream's digest (the chain value after its last frame).
    public var digest: String
    public var frames: UInt64
    public var dataBytes: UInt64
    public var zeroBytes: UInt64
    /// The primary's checkpoint record: writers, markers, recovery metadata, timings.
    public var record: CheckpointRecord
    /// Volumes and writer drop-ins, to verify and start the copy here.
    public var environment: CheckpointEnvironment?

    static var encoder: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        return encoder
    }

    static var decoder: JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }
}

/// A partial apply's durable progress: every frame before `frames` is on disk (fsynced)
/// and `chain` is the digest chain after them.
public struct ApplyProgress: Codable, Sendable, Equatable {
    public var volume: String
    public var base: String?
    public var target: String
    /// SHA-256 of the stream header's bytes: a resumed stream must be the same stream.
    public var stream: String
    public var frames: UInt64
    public var chain: String
    public var dataBytes: UInt64
    public var zeroBytes: UInt64

    static func load(_ path: String) -> ApplyProgress? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        return try? JSONDecoder().decode(ApplyProgress.self, from: data)
    }
}

/// Small helpers for files that must survive a crash.
enum Durable {
    /// Writes `bytes` to a temporary sibling, fsyncs it, renames it over `path`, fsyncs the directory.
    static func write(_ bytes: [UInt8], to path: String, mode: mode_t = 0o644) throws {
        let temporary = path + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
        guard fd >= 0 else { throw DeltaStreamError.store("cannot write \(temporary): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Foundation.write(fd, $0.baseAddress! + done, bytes.count - done) }
            guard n > 0 else { throw DeltaStreamError.store("cannot write \(temporary): \(String(cString: strerror(errno)))") }
            done += n
        }
        guard fsync(fd) == 0 else { throw DeltaStreamError.store("fsync \(temporary): \(String(cString: strerror(errno)))") }
        guard rename(temporary, path) == 0 else {
            throw DeltaStreamError.store("rename \(temporary) → \(path): \(String(cString: strerror(errno)))")
        }
        try syncDirectory((path as NSString).deletingLastPathComponent)
    }

    static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw DeltaStreamError.store("cannot open directory \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw DeltaStreamError.store("fsync \(path): \(String(cString: strerror(errno)))") }
    }
}
